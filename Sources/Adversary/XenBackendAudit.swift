import SharedMemory
import XenRing

/// One frontend attack against a Xen backend, judged: what the backend did, whether it
/// still served a good request afterwards, and whether that is what §1 of design.md asks.
public struct XenAuditRecord: Sendable, Equatable, CustomStringConvertible {
    /// The frontend attack.
    public let attack: XenFrontendAttack
    /// What the backend did about it.
    public let outcome: XenAuditOutcome
    /// Whether a good request was served on the same connection after the malformed one
    /// (nil for a ring corruption, after which the connection must be gone).
    public let servedAfter: Bool?
    /// Whether the outcome is what design.md §1 asks of a backend.
    public let isSafe: Bool

    /// One line, as `ringfence xen-blk audit` prints it.
    public var description: String {
        let after = servedAfter.map { $0 ? ", then served a good request" : ", then did NOT serve a good request" }
        return "audit \(attack.rawValue): \(outcome)\(after ?? "") -> \(isSafe ? "ok" : "FAIL")"
    }
}

extension Auditor {
    /// The Xen verdict: a corrupt ring (`req-prod-jump`) must get the connection dropped;
    /// any other malformed request must be refused (ERROR or EOPNOTSUPP) and the backend
    /// must then serve a good request on the same connection.
    public static func judge(
        _ attack: XenFrontendAttack, outcome: XenAuditOutcome, servedAfter: Bool?
    ) -> XenAuditRecord {
        let safe: Bool
        if attack == .requestProducerJump {
            safe = outcome == .dropped
        } else {
            let refused = outcome == .refused(.error) || outcome == .refused(.notSupported)
            safe = refused && servedAfter == true
        }
        return XenAuditRecord(attack: attack, outcome: outcome, servedAfter: servedAfter, isSafe: safe)
    }

    /// Audits the Xen backend listening on `socket`: each attack on a fresh connection
    /// (`timeout` seconds per request), judged by `judge`; `record` sees each verdict as
    /// it is reached. Throws when a connection cannot be made.
    public static func auditXenBackend(
        socket: String, attacks: [XenFrontendAttack] = XenFrontendAttack.allCases, timeout: Double,
        record: (XenAuditRecord) -> Void = { _ in }
    ) throws -> [XenAuditRecord] {
        var records: [XenAuditRecord] = []
        for attack in attacks {
            let device = try XenBlkFrontendDevice.connect(channel: try UnixChannel.connect(path: socket))
            device.timeout = timeout
            let outcome = XenFrontendAdversary.send(attack, on: device)
            var servedAfter: Bool?
            if attack != .requestProducerJump {
                var page = [UInt8](repeating: 0, count: 4096)
                servedAfter = (try? page.withUnsafeMutableBytes { try device.read(sector: 0, into: $0) }) != nil
            }
            let verdict = judge(attack, outcome: outcome, servedAfter: servedAfter)
            record(verdict)
            records.append(verdict)
            if attack != .requestProducerJump { device.disconnect() }
        }
        return records
    }
}
