#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
public import XenRing

/// Netback misbehaviours the hardened netfront must survive (issue 17, the checks Linux's
/// netfront got after XSA-391/392/403), as data; `XenNetBackendAdversary` plays them
/// through the real netback's `XenNetBackendHooks`.
public enum XenNetBackendAttack: String, Sendable, CaseIterable {
    case rxIdOutOfRange = "net-rx-id-out-of-range"
    /// An rx response id that was never posted.
    case rxIdNotPosted = "net-rx-id-not-posted"
    /// Every rx response written twice (same id).
    case rxIdDuplicated = "net-rx-id-duplicated"
    /// `offset + size` beyond the page (XSA-392).
    case rxOffsetPastPage = "net-rx-offset-past-page"
    /// more_data set on every slot: a chain that never ends.
    case rxEndlessMoreData = "net-rx-endless-more-data"
    /// An extra-info segment of type 7.
    case rxBogusExtraType = "net-rx-bogus-extra-type"
    case rxStatusGarbage = "net-rx-status-garbage"
    case txStatusGarbage = "net-tx-status-garbage"
    /// A tx response for an id that is not in flight.
    case txIdNotInFlight = "net-tx-id-not-in-flight"
    /// tx rsp_prod published 1000 past the responses written.
    case responseProducerRunAhead = "net-rsp-prod-run-ahead"
    /// tx rsp_prod published behind the previous value.
    case responseProducerBackwards = "net-rsp-prod-backwards"
    /// Granted pages left mapped (GTF_reading/GTF_writing set) when answered (XSA-396).
    case grantKeptMapped = "net-grant-kept-mapped"
    /// 300 ms of events with no response after each batch.
    case eventStorm = "net-event-storm"

    /// What the frontend must do: the device disabled with a violation of this case
    /// (name of the `XenViolation` case), or nil: stay up and keep working.
    public var expectedViolation: String? {
        switch self {
        case .rxIdOutOfRange: return "xenResponseIdOutOfRange"
        case .rxIdNotPosted, .rxIdDuplicated, .txIdNotInFlight: return "xenResponseIdNotInFlight"
        case .rxOffsetPastPage: return "xenNetRxOffsetBeyondPage"
        case .rxEndlessMoreData: return "xenNetChainIncomplete"
        case .rxBogusExtraType: return "xenNetExtraInfoType"
        case .rxStatusGarbage, .txStatusGarbage: return "xenNetStatusUnknown"
        case .responseProducerRunAhead: return "xenResponseProducerBeyondInFlight"
        case .responseProducerBackwards: return "xenResponseProducerWentBackwards"
        case .grantKeptMapped: return "xenGrantStillMapped"
        case .eventStorm: return nil
        }
    }
}

/// Netfront misbehaviours the hardened netback must survive: a malformed frame is
/// answered NETIF_RSP_ERROR and serving goes on; a corrupt ring or chain drops the
/// connection (and only it).
public enum XenNetFrontendAttack: String, Sendable, CaseIterable {
    case requestProducerJump = "net-req-prod-jump"
    /// more_data on the last slot: the chain runs past req_prod.
    case txEndlessMoreData = "net-tx-endless-more-data"
    case txOffsetPastPage = "net-tx-offset-past-page"
    case txBogusExtraType = "net-tx-bogus-extra-type"
    case grantRefOutOfRange = "net-tx-gref-out-of-range"
    case grantNotGranted = "net-tx-gref-not-granted"
    /// The first slot's size (the frame's) smaller than its fragments.
    case sizeBelowFragments = "net-tx-size-below-fragments"
    /// A 10-byte frame (below ETH_HLEN).
    case runtFrame = "net-tx-runt-frame"

    /// True when the connection must be dropped; false when the frame must be refused
    /// and the next one served.
    public var mustDrop: Bool {
        switch self {
        case .requestProducerJump, .txEndlessMoreData, .txOffsetPastPage, .txBogusExtraType: return true
        case .grantRefOutOfRange, .grantNotGranted, .sizeBelowFragments, .runtFrame: return false
        }
    }
}

/// The real netback with one `XenNetBackendAttack` switched on (hooks only).
public final class XenNetBackendAdversary: XenNetBackendHooks {
    public let attack: XenNetBackendAttack

    public init(_ attack: XenNetBackendAttack) { self.attack = attack }

    public func willRespondRx(_ response: inout NetRxResponseFields) -> Int {
        switch attack {
        case .rxIdOutOfRange: response.id = 1000
        case .rxIdNotPosted: response.id = 200
        case .rxIdDuplicated: return 2
        case .rxOffsetPastPage: response.offset = 4090
        case .rxEndlessMoreData: response.flags |= NetFlags.rxMoreData
        case .rxStatusGarbage: response.status = -77
        default: break
        }
        return 1
    }

    public func willRespondTx(_ response: inout NetTxResponseFields) -> Int {
        switch attack {
        case .txStatusGarbage: response.status = 77
        case .txIdNotInFlight: response.id &+= 1
        default: break
        }
        return 1
    }

    public func willSendRx(gso: inout NetGSO?) {
        if attack == .rxBogusExtraType { gso = NetGSO(type: .tcpv4, size: 1448) }
    }

    public func willWriteRxExtra(_ word: inout UInt64) {
        if attack == .rxBogusExtraType { word = (word & ~0xff) | 7 }
    }

    public func shouldUnmapGrant(_ backend: NetBackend, ref: UInt32) -> Bool { attack != .grantKeptMapped }

    public func willPublish(rx: Bool, responseProducer: UInt32, previous: UInt32) -> UInt32 {
        guard !rx else { return responseProducer }
        switch attack {
        case .responseProducerRunAhead: return responseProducer &+ 1000
        case .responseProducerBackwards: return previous &- 3
        default: return responseProducer
        }
    }

    public func didServe(_ connection: XenNetBackendConnection, frames: Int) {
        guard attack == .eventStorm else { return }
        let end = Deadline.after(seconds: 0.3)
        while !end.hasPassed {
            connection.events.outgoing.signal()
            usleep(100)
        }
    }
}

/// The real netfront posting one malformed frame (`XenNetFrontendAttack`) through its
/// `XenNetFrontendHooks`; the hook fires on the next frame only.
public final class XenNetFrontendAdversary: XenNetFrontendHooks {
    public let attack: XenNetFrontendAttack
    var armed = true
    var slotsSeen = 0

    public init(_ attack: XenNetFrontendAttack) { self.attack = attack }

    public func willPostTx(_ slot: UnsafeMutableRawPointer, isExtra: Bool, frontend: NetFrontend) {
        guard armed else { return }
        slotsSeen += 1
        if isExtra {
            if attack == .txBogusExtraType {
                slot.storeBytes(of: 9 as UInt8, toByteOffset: 0, as: UInt8.self)
                armed = false
            }
            return
        }
        func store16(_ value: UInt16, _ offset: Int) {
            slot.storeBytes(of: value, toByteOffset: offset, as: UInt16.self)
        }
        let flags = slot.load(fromByteOffset: NetifLayout.txRequestFlags, as: UInt16.self)
        switch attack {
        case .txEndlessMoreData: store16(flags | NetFlags.txMoreData, NetifLayout.txRequestFlags)
        case .txOffsetPastPage: store16(4000, NetifLayout.txRequestOffset)
        case .grantRefOutOfRange:
            slot.storeBytes(of: 0xffff_fff0 as UInt32, toByteOffset: NetifLayout.txRequestGrantRef, as: UInt32.self)
        case .grantNotGranted:
            slot.storeBytes(
                of: UInt32(truncatingIfNeeded: frontend.memory.grants.entryCount - 1),
                toByteOffset: NetifLayout.txRequestGrantRef, as: UInt32.self)
        case .sizeBelowFragments: if slotsSeen == 1 { store16(100, NetifLayout.txRequestSize16) }
        case .runtFrame: store16(10, NetifLayout.txRequestSize16)
        case .requestProducerJump, .txBogusExtraType: break
        }
        // Disarmed after the frame's last slot (after its extra segment for the extra attack).
        if flags & NetFlags.txMoreData == 0 && attack != .txBogusExtraType { armed = attack == .requestProducerJump }
    }

    public func willPublishTx(requestProducer: UInt32) -> UInt32 {
        guard armed, attack == .requestProducerJump else { return requestProducer }
        armed = false
        return requestProducer &+ 1000
    }
}

/// How one netif attack went, judged against what it must do.
public struct XenNetAuditRecord: Sendable, Equatable, CustomStringConvertible {
    public let attack: String
    /// "netfront" (a backend attack, our frontend under test) or "netback".
    public let target: String
    public let expected: String
    public let outcome: String
    public let isSafe: Bool

    public init(attack: String, target: String, expected: String, outcome: String, isSafe: Bool) {
        self.attack = attack
        self.target = target
        self.expected = expected
        self.outcome = outcome
        self.isSafe = isSafe
    }

    public var description: String { "audit \(attack) (\(target)): \(outcome) -> \(isSafe ? "ok" : "FAIL")" }
}

/// The name of a violation's case (`xenResponseIdOutOfRange`), to compare outcomes
/// whose payload (grant refs, ids) depends on the run.
public func violationCase(_ v: XenViolation) -> String {
    Mirror(reflecting: v).children.first?.label ?? "\(v)"
}

/// A body on a dedicated OS thread (the peer of an in-process audit).
final class AuditThread: @unchecked Sendable {
    private var thread = pthread_t()
    private let body: @Sendable () -> Void
    private var started = false

    init(_ body: @escaping @Sendable () -> Void) {
        self.body = body
        let context = Unmanaged.passRetained(self).toOpaque()
        started =
            pthread_create(
                &thread, nil,
                { raw in
                    guard let raw else { return nil }
                    Unmanaged<AuditThread>.fromOpaque(raw).takeRetainedValue().body()
                    return nil
                }, context) == 0
        if !started { Unmanaged<AuditThread>.fromOpaque(context).release() }
    }

    func join() {
        if started { pthread_join(thread, nil) }
        started = false
    }
}

struct SendableBox<T>: @unchecked Sendable {
    let value: T
}

extension Auditor {
    /// Every netif attack, in process, over socketpairs with real memfds and eventfds:
    /// each backend attack against our netfront (the device must be disabled with the
    /// expected violation, or stay up for the storm), each frontend attack against our
    /// netback (dropped, or refused and the next frame served).
    public static func auditXenNet(
        backendAttacks: [XenNetBackendAttack] = XenNetBackendAttack.allCases,
        frontendAttacks: [XenNetFrontendAttack] = XenNetFrontendAttack.allCases, timeout: Double = 2,
        record: (XenNetAuditRecord) -> Void = { _ in }
    ) -> [XenNetAuditRecord] {
        var records: [XenNetAuditRecord] = []
        for attack in backendAttacks {
            let r = auditNetfront(attack, timeout: timeout)
            record(r)
            records.append(r)
        }
        for attack in frontendAttacks {
            let r = auditNetback(attack, timeout: timeout)
            record(r)
            records.append(r)
        }
        return records
    }

    static func frame(_ n: Int, size: Int) -> [UInt8] {
        [0, 0x16, 0x3e, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x88, 0xb5]
            + (14..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ n) }
    }

    /// Pings a loopback netback played by `attack`; the first failure is the outcome.
    static func auditNetfront(_ attack: XenNetBackendAttack, timeout: Double) -> XenNetAuditRecord {
        let expected = attack.expectedViolation.map { "disabled: \($0)" } ?? "stays up, frames echoed"
        func verdict(_ outcome: String, _ safe: Bool) -> XenNetAuditRecord {
            XenNetAuditRecord(
                attack: attack.rawValue, target: "netfront", expected: expected, outcome: outcome, isSafe: safe)
        }
        guard let (mine, theirs) = try? UnixChannel.pair() else { return verdict("no socketpair", false) }
        let box = SendableBox(value: theirs)
        let server = AuditThread {
            guard
                let c = try? XenNetBackendConnection.accept(
                    channel: box.value, mode: .loopback, hooks: XenNetBackendAdversary(attack))
            else { return }
            _ = c.run(idleTimeout: 3)
        }
        defer { server.join() }
        let device: XenNetFrontendDevice
        do { device = try XenNetFrontendDevice.connect(channel: mine, until: .after(seconds: timeout)) } catch {
            mine.shutdown()
            return verdict("handshake failed: \(error)", false)
        }
        device.timeout = timeout
        defer { device.disconnect() }
        var buffer = [UInt8](repeating: 0, count: 65536)
        for n in 0..<3 {
            let data = frame(n, size: 64)
            var failure: XenNetError?
            var got: NetReceivedFrame?
            data.withUnsafeBytes { b in
                do throws(XenNetError) { try device.send(b, token: UInt64(n)) } catch { failure = error }
            }
            if failure == nil {
                let deadline = Deadline.after(seconds: timeout)
                buffer.withUnsafeMutableBytes { b in
                    do throws(XenNetError) {
                        got = try device.receive(into: b, until: deadline)
                        try device.reapTx()
                    } catch { failure = error }
                }
            }
            if failure == nil, let v = device.violation { failure = .broken(v) }
            if let failure {
                guard case .broken(let v) = failure else { return verdict("\(failure)", false) }
                let safe = attack.expectedViolation == violationCase(v) && device.front.isBroken
                return verdict("disabled: \(v)", safe)
            }
            guard let got, got.status == .okay, Array(buffer[0..<got.length]) == data else {
                return verdict("frame \(n) lost or changed, device up", false)
            }
        }
        if attack == .eventStorm {
            let spurious = device.events.spuriousEvents
            return verdict("stayed up, 3 frames echoed, \(spurious) spurious wake-ups backed off", true)
        }
        return verdict("accepted: 3 frames echoed, device still up", attack.expectedViolation == nil)
    }

    /// Sends one malformed frame through our netfront to our netback, then a good one.
    static func auditNetback(_ attack: XenNetFrontendAttack, timeout: Double) -> XenNetAuditRecord {
        let expected = attack.mustDrop ? "connection dropped" : "frame refused (ERROR), next frame echoed"
        func verdict(_ outcome: String, _ safe: Bool) -> XenNetAuditRecord {
            XenNetAuditRecord(
                attack: attack.rawValue, target: "netback", expected: expected, outcome: outcome, isSafe: safe)
        }
        guard let (mine, theirs) = try? UnixChannel.pair() else { return verdict("no socketpair", false) }
        let box = SendableBox(value: theirs)
        let end = SendableBox(value: UnsafeMutablePointer<XenNetBackendConnection.End?>.allocate(capacity: 1))
        end.value.initialize(to: nil)
        defer { end.value.deallocate() }
        let server = AuditThread {
            guard let c = try? XenNetBackendConnection.accept(channel: box.value, mode: .loopback) else { return }
            end.value.pointee = c.run(idleTimeout: 3)
        }
        let device: XenNetFrontendDevice
        do { device = try XenNetFrontendDevice.connect(channel: mine, until: .after(seconds: timeout)) } catch {
            mine.shutdown()
            server.join()
            return verdict("handshake failed: \(error)", false)
        }
        device.timeout = timeout
        device.front.hooks = XenNetFrontendAdversary(attack)
        let size = attack == .sizeBelowFragments ? 5000 : 1500
        let bad = frame(0, size: size)
        let gso = attack == .txBogusExtraType ? NetGSO(type: .tcpv4, size: 1448) : nil
        let posted: Bool = bad.withUnsafeBytes { b in
            do throws(XenNetError) {
                try device.submit(b, token: 1, gso: gso)
                return true
            } catch { return false }
        }
        guard posted else {
            device.disconnect()
            server.join()
            return verdict("could not post", false)
        }
        device.kick()
        _ = device.events.notify()
        if attack.mustDrop {
            let dropped = device.waitForDisconnect(until: .after(seconds: timeout))
            device.front.hooks = nil
            server.join()
            let how = end.value.pointee.map { "\($0)" } ?? "?"
            return verdict(dropped ? "connection dropped: \(how)" : "connection kept", dropped)
        }
        defer {
            device.disconnect()
            server.join()
        }
        do throws(XenNetError) {
            try device.waitForTx(until: .after(seconds: timeout))
        } catch { return verdict("\(error)", false) }
        device.front.hooks = nil
        let refused = device.txFailed == 1
        var buffer = [UInt8](repeating: 0, count: 65536)
        let good = frame(1, size: 200)
        var echoed = false
        good.withUnsafeBytes { b in
            do throws(XenNetError) {
                try device.send(b, token: 2)
                var got: NetReceivedFrame?
                let deadline = Deadline.after(seconds: timeout)
                buffer.withUnsafeMutableBytes { out in got = try? device.receive(into: out, until: deadline) }
                echoed = got?.length == good.count && Array(buffer[0..<good.count]) == good
            } catch {}
        }
        let outcome =
            (refused ? "refused (ERROR)" : "accepted") + (echoed ? ", then echoed a good frame" : ", then NOT served")
        return verdict(outcome, refused && echoed)
    }

    /// The netif audit as a Markdown table.
    public static func xenNetMarkdown(_ records: [XenNetAuditRecord]) -> String {
        var s = "| Attack | Target | Expected | Outcome | Verdict |\n|---|---|---|---|---|\n"
        for r in records {
            s +=
                "| `\(r.attack)` | \(r.target) | \(r.expected) | \(r.outcome) | \(r.isSafe ? "contained" : "**FAIL**") |\n"
        }
        let failed = records.filter { !$0.isSafe }.count
        s += "\n\(records.count) netif attacks, \(records.count - failed) contained, \(failed) failed.\n"
        return s
    }
}
