import Foundation
import SharedMemory

/// `ringfence audit --target payload` (issue 18): the payload lies against the plain
/// driver and against the verified layer over it, one report each, in the audit's format.
extension Auditor {
    /// Runs each payload lie through `PayloadProbe` on `layer`, in this process (the
    /// probe's requests time out, so a lie cannot hang it).
    public func runPayload(_ attacks: [Attack], layer: PayloadProbe.Layer) -> AuditReport {
        let start = monotonicNanoseconds()
        var records: [AuditRecord] = []
        for (i, a) in attacks.enumerated() {
            progress(i + 1, attacks.count, "\(a.name), \(layer)", start)
            let dir = scratch("payload-\(layer)-\(a.name)")
            records.append(PayloadProbe.run(a, layer: layer, directory: dir).payloadRecord(for: a, layer: layer))
            try? FileManager.default.removeItem(atPath: dir)
        }
        progress(attacks.count + 1, attacks.count, "done", start)
        let target =
            switch layer {
            case .plain: "the plain VirtioBlock driver"
            case .verified: "VerifiedBlock over the VirtioBlock driver"
            }
        return AuditReport(
            target: target, records: records, seconds: Double(monotonicNanoseconds() &- start) / 1e9)
    }
}

extension ProbeResult {
    /// A payload lie's row: against the plain driver, wrong bytes with status OK are
    /// "undetected payload tampering" (the expected outcome: that layer cannot see them);
    /// against the verified layer only the violation that names the lie is expected.
    public func payloadRecord(for attack: Attack, layer: PayloadProbe.Layer) -> AuditRecord {
        let outcome: Outcome
        switch signature {
        case .unaffected: outcome = .unaffected
        case .wrongPayload: outcome = .undetectedTampering
        default: outcome = .contained
        }
        let expected = PayloadProbe.expected(attack, layer: layer).contains(signature)
        return AuditRecord(
            attack: attack, outcome: outcome, seconds: seconds, evidence: "\(signature): \(evidence)",
            asExpected: expected, signature: signature.description)
    }
}
