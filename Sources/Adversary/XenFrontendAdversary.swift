import SharedMemory
public import XenRing

/// The real Xen frontend posting one malformed request (`XenFrontendAttack`) through its
/// `XenFrontendHooks`, to audit a backend. The hook fires on the next request only, so
/// the same device can then check that the backend still serves a good one.
public final class XenFrontendAdversary: XenFrontendHooks {
    /// The misbehaviour switched on.
    public let attack: XenFrontendAttack
    var armed = true

    /// A hook set playing `attack`.
    public init(_ attack: XenFrontendAttack) { self.attack = attack }

    /// Rewrites the request before it is published.
    public func willPost(_ request: UnsafeMutableRawPointer, frontend: BlkFrontend) {
        guard armed, attack != .requestProducerJump else { return }
        armed = false
        func segment(_ s: Int, ref: UInt32? = nil, first: UInt8, last: UInt8) {
            let p = request + BlkifLayout.segments + s * BlkifLayout.segmentSize
            if let ref { p.storeBytes(of: ref, toByteOffset: BlkifLayout.segmentGrantRef, as: UInt32.self) }
            p.storeBytes(of: first, toByteOffset: BlkifLayout.segmentFirstSector, as: UInt8.self)
            p.storeBytes(of: last, toByteOffset: BlkifLayout.segmentLastSector, as: UInt8.self)
        }
        switch attack {
        case .tooManySegments:
            for s in 1..<BlkifLayout.maxSegments { segment(s, ref: 0, first: 0, last: 7) }
            request.storeBytes(of: 12 as UInt8, toByteOffset: BlkifLayout.segmentCount, as: UInt8.self)
        case .firstAfterLast: segment(0, first: 5, last: 2)
        case .lastSectorBeyondPage: segment(0, first: 0, last: 8)
        case .grantRefOutOfRange: segment(0, ref: 0xffff_fff0, first: 0, last: 7)
        case .grantNotGranted:
            segment(0, ref: UInt32(truncatingIfNeeded: frontend.memory.grants.entryCount - 1), first: 0, last: 7)
        case .sectorBeyondCapacity:
            let capacity = frontend.capacitySectors
            let sector = capacity == .max ? UInt64.max - 3 : capacity
            request.storeBytes(of: sector, toByteOffset: BlkifLayout.sectorNumber, as: UInt64.self)
        case .requestProducerJump: break
        }
    }

    /// `req-prod-jump`: req_prod published 1000 past the requests written.
    public func willPublish(requestProducer: UInt32) -> UInt32 {
        guard armed, attack == .requestProducerJump else { return requestProducer }
        armed = false
        return requestProducer &+ 1000
    }

    /// Sends `attack` on `device` and reports how the backend reacted. After a ring
    /// corruption the device is unusable; after a malformed request it can go on.
    public static func send(_ attack: XenFrontendAttack, on device: XenBlkFrontendDevice) -> XenAuditOutcome {
        let adversary = XenFrontendAdversary(attack)
        device.front.hooks = adversary
        defer { device.front.hooks = nil }
        if attack == .requestProducerJump {
            // A request without data, so no buffer of ours stays posted behind the dead ring.
            do { try device.submitFlush(token: .max) } catch { return .silent }
            device.kick()
            _ = device.events.notify()
            // The backend must drop the connection: the channel becomes readable (EOF).
            return device.waitForDisconnect(until: .after(seconds: device.timeout)) ? .dropped : .silent
        }
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        do {
            try device.read(sector: 0, into: page)
            return .accepted
        } catch {
            if case .status(let status) = error { return .refused(status) }
            return .silent
        }
    }
}

/// What a backend did with a malformed request (an audit of the backend).
public enum XenAuditOutcome: Equatable, Sendable, CustomStringConvertible {
    /// Failed the request (the expected answer to a bad request).
    case refused(BlkStatus)
    /// Answered OKAY: the backend accepted a request it must refuse.
    case accepted
    /// Dropped the connection (the expected answer to a corrupt ring).
    case dropped
    /// Neither answered nor dropped within the deadline.
    case silent

    /// One line: the backend's answer.
    public var description: String {
        switch self {
        case .refused(let s): return "refused (\(s))"
        case .accepted: return "ACCEPTED"
        case .dropped: return "connection dropped"
        case .silent: return "no answer"
        }
    }
}
