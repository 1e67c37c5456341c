#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
public import XenRing

/// The real Xen backend with one `XenBackendAttack` switched on: it acts only through
/// `XenBackendHooks`, so the attacks run on the code `serve-xen-blk` ships, as
/// `AdversaryDevice` does for virtio-blk. Pass it as `hooks` to
/// `XenBlkBackendConnection.accept` (or set `BlkBackend.hooks`).
public final class XenBackendAdversary: XenBackendHooks {
    /// The misbehaviour switched on.
    public let attack: XenBackendAttack
    /// Flags written over a grant entry by `grant-flags-scribbled`.
    public static let scribbledFlags: UInt16 = 0x00e2

    /// A hook set playing `attack`.
    public init(_ attack: XenBackendAttack) { self.attack = attack }

    /// Handshake attacks rewrite the backend's node.
    public func willAnnounce(_ node: inout XenStoreNode) {
        switch attack {
        case .sectorsZero: node["sectors"] = "0"
        case .sectorsHuge: node["sectors"] = "\(UInt64(1) << 63)"
        case .sectorSizeThree: node["sector-size"] = "3"
        default: break
        }
    }

    /// Response attacks rewrite a response (or answer it twice, or never).
    public func willRespond(_ response: inout BlkResponseFields) -> Int {
        switch attack {
        case .responseIdOutOfRange: response.id = 1000
        case .responseIdNotInFlight: response.id = (response.id &+ 1) & UInt64(BlkifLayout.ringSize - 1)
        case .wrongOperation: response.operation ^= 1
        case .unknownStatus: response.status = 7
        case .neverRespond: return 0
        case .duplicateResponse: return 2
        default: break
        }
        return 1
    }

    /// `grant-still-mapped` keeps the pages mapped after answering.
    public func shouldUnmapGrants(_ backend: BlkBackend, segments: Int) -> Bool { attack != .grantStillMapped }

    /// Grant attacks scribble on the grant entries after a transfer.
    public func didEndTransfer(_ backend: BlkBackend, segments: Int) {
        guard attack == .grantFlagsScribbled else { return }
        let memory = backend.mapper.memory
        for s in 0..<segments {
            let ref = backend.ref(s)
            guard Int(ref) < memory.entryCount else { continue }
            SharedAccess.store16Release(
                memory.entries + Int(ref) * GrantLayout.entrySize + GrantLayout.flags, Self.scribbledFlags)
        }
    }

    /// Producer attacks move `rsp_prod` where it must not go.
    public func willPublish(responseProducer: UInt32, previous: UInt32) -> UInt32 {
        switch attack {
        case .responseProducerJump: return responseProducer &+ 1000
        case .responseProducerBackwards: return previous &- 3
        default: return responseProducer
        }
    }

    /// `rewrite-after-publish`: the last response's id changed once rsp_prod moved.
    public func didPublish(_ backend: BlkBackend) {
        guard attack == .rewriteAfterPublish else { return }
        SharedAccess.store64(backend.responseSlot(backend.responseProducer &- 1) + BlkifLayout.responseId, 999)
    }

    /// `event-storm`: 300 ms of events with no response, then the answer.
    public func didServe(_ connection: XenBlkBackendConnection, requests: Int) {
        guard attack == .eventStorm else { return }
        let end = Deadline.after(seconds: 0.3)
        while !end.hasPassed {
            connection.events.outgoing.signal()
            usleep(100)
        }
    }
}
