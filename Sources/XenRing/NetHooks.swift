/// One tx response as the netback is about to write it, raw: a hook may set any value.
public struct NetTxResponseFields: Sendable, Equatable {
    public var id: UInt16
    public var status: Int16
}

/// One rx response as the netback is about to write it, raw.
public struct NetRxResponseFields: Sendable, Equatable {
    public var id: UInt16
    public var offset: UInt16
    public var flags: UInt16
    public var status: Int16
}

/// The points where the real netback (`NetBackend`, `XenNetBackendConnection`) lets an
/// observer change what it does: the Adversary's misbehaving backend acts only here, so
/// every attack runs on the code `serve-xen-net` ships. Nil in service; every method has
/// a default that changes nothing.
public protocol XenNetBackendHooks: AnyObject {
    /// The handshake node about to be announced.
    func willAnnounce(_ node: inout XenStoreNode)
    /// A tx response about to be written; how many times to write it (1 honestly).
    func willRespondTx(_ response: inout NetTxResponseFields) -> Int
    /// An rx response about to be written; how many times to write it.
    func willRespondRx(_ response: inout NetRxResponseFields) -> Int
    /// A frame about to be sent on rx: the GSO segment to add (or not).
    func willSendRx(gso: inout NetGSO?)
    /// The extra-info segment about to be written into an rx response slot (8 bytes).
    func willWriteRxExtra(_ word: inout UInt64)
    /// A granted page was copied; false leaves it mapped.
    func shouldUnmapGrant(_ backend: NetBackend, ref: UInt32) -> Bool
    /// rsp_prod of the tx (`rx == false`) or rx ring about to be published.
    func willPublish(rx: Bool, responseProducer: UInt32, previous: UInt32) -> UInt32
    /// The connection served `frames` tx frames or sent rx frames, before publishing.
    func didServe(_ connection: XenNetBackendConnection, frames: Int)
}

extension XenNetBackendHooks {
    public func willAnnounce(_ node: inout XenStoreNode) {}
    public func willRespondTx(_ response: inout NetTxResponseFields) -> Int { 1 }
    public func willRespondRx(_ response: inout NetRxResponseFields) -> Int { 1 }
    public func willSendRx(gso: inout NetGSO?) {}
    public func willWriteRxExtra(_ word: inout UInt64) {}
    public func shouldUnmapGrant(_ backend: NetBackend, ref: UInt32) -> Bool { true }
    public func willPublish(rx: Bool, responseProducer: UInt32, previous: UInt32) -> UInt32 { responseProducer }
    public func didServe(_ connection: XenNetBackendConnection, frames: Int) {}
}

/// The points where the real netfront (`NetFrontend`) lets an observer change what it
/// posts on tx: the Adversary audits a netback through them.
public protocol XenNetFrontendHooks: AnyObject {
    /// The private copy of a tx slot (12 bytes: a request, or an extra-info segment when
    /// `isExtra`) about to be stored whole into the ring; may rewrite any byte.
    func willPostTx(_ slot: UnsafeMutableRawPointer, isExtra: Bool, frontend: NetFrontend)
    /// The tx req_prod about to be published; returns the value to publish.
    func willPublishTx(requestProducer: UInt32) -> UInt32
    /// The rx response at `position` was loaded once and validated, and `page` (still
    /// granted to the backend, persistent rx grants) is about to be copied out: where a
    /// test plays a backend rewriting the response slot and the page at the worst moment.
    func willCopyRx(position: UInt32, page: UnsafeMutableRawPointer)
}

extension XenNetFrontendHooks {
    public func willPostTx(_ slot: UnsafeMutableRawPointer, isExtra: Bool, frontend: NetFrontend) {}
    public func willPublishTx(requestProducer: UInt32) -> UInt32 { requestProducer }
    public func willCopyRx(position: UInt32, page: UnsafeMutableRawPointer) {}
}
