/// One response as the backend is about to write it, raw: a hook may set any value,
/// including ones no honest backend sends.
public struct BlkResponseFields: Sendable, Equatable {
    /// The request id echoed.
    public var id: UInt64
    /// The operation echoed.
    public var operation: UInt8
    /// BLKIF_RSP_* status.
    public var status: Int16

    /// The fields of one response.
    public init(id: UInt64, operation: UInt8, status: Int16) {
        self.id = id
        self.operation = operation
        self.status = status
    }
}

/// The points where the real backend (`BlkBackend`, `XenBlkBackendConnection`) lets an
/// observer change what it does. The Adversary's misbehaving backend acts only here, so
/// every attack runs on the code `serve-xen-blk` ships (design.md §7); in service the
/// hooks are nil. Every method has a default that changes nothing.
public protocol XenBackendHooks: AnyObject {
    /// The handshake node about to be announced (sectors, sector-size, features).
    func willAnnounce(_ node: inout XenStoreNode)
    /// A response about to be written; returns how many times to write it (1 honestly,
    /// 0 to never answer, 2 to answer twice).
    func willRespond(_ response: inout BlkResponseFields) -> Int
    /// A request's `segments` grants, mapped and copied; false leaves them mapped.
    func shouldUnmapGrants(_ backend: BlkBackend, segments: Int) -> Bool
    /// After the grants of a request were unmapped (or left mapped).
    func didEndTransfer(_ backend: BlkBackend, segments: Int)
    /// rsp_prod about to be published (`previous` was published last); returns the value
    /// to publish.
    func willPublish(responseProducer: UInt32, previous: UInt32) -> UInt32
    /// rsp_prod was published, before the notify check.
    func didPublish(_ backend: BlkBackend)
    /// The connection served `requests` requests, before it publishes their responses.
    func didServe(_ connection: XenBlkBackendConnection, requests: Int)
}

extension XenBackendHooks {
    /// Announces the node unchanged.
    public func willAnnounce(_ node: inout XenStoreNode) {}
    /// Writes the response once, unchanged.
    public func willRespond(_ response: inout BlkResponseFields) -> Int { 1 }
    /// Unmaps every page.
    public func shouldUnmapGrants(_ backend: BlkBackend, segments: Int) -> Bool { true }
    /// Nothing to do.
    public func didEndTransfer(_ backend: BlkBackend, segments: Int) {}
    /// Publishes `responseProducer` unchanged.
    public func willPublish(responseProducer: UInt32, previous: UInt32) -> UInt32 { responseProducer }
    /// Nothing to do.
    public func didPublish(_ backend: BlkBackend) {}
    /// Nothing to do.
    public func didServe(_ connection: XenBlkBackendConnection, requests: Int) {}
}

/// The points where the real frontend (`BlkFrontend`) lets an observer change what it
/// posts: the Adversary audits a backend through them with requests the backend must
/// refuse. Nil in service; each check costs one branch on the hot path.
public protocol XenFrontendHooks: AnyObject {
    /// The private copy of a request (all `BlkifLayout.requestSize` bytes, zero past what
    /// the request defines) about to be copied whole into its slot; may rewrite any byte.
    func willPost(_ request: UnsafeMutableRawPointer, frontend: BlkFrontend)
    /// req_prod about to be published; returns the value to publish.
    func willPublish(requestProducer: UInt32) -> UInt32
}

extension XenFrontendHooks {
    /// Posts the request unchanged.
    public func willPost(_ request: UnsafeMutableRawPointer, frontend: BlkFrontend) {}
    /// Publishes `requestProducer` unchanged.
    public func willPublish(requestProducer: UInt32) -> UInt32 { requestProducer }
}
