import Foundation
import Testing

@testable import Adversary

/// Issue 18: each payload lie passes the plain driver undetected (reported as such) and is
/// caught by the verified layer with the violation that names it.
@Suite("payload lies: plain driver vs verified layer", .serialized)
struct PayloadAttackTests {
    func directory(_ name: String) -> String {
        NSTemporaryDirectory() + "payload-\(getpid())-\(name)-\(UInt32.random(in: 0...UInt32.max))"
    }

    @Test func honestDeviceIsUnaffectedOnBothLayers() {
        for layer in PayloadProbe.Layer.allCases {
            let dir = directory("honest-\(layer)")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let r = PayloadProbe.run(nil, layer: layer, directory: dir)
            #expect(r.signature == .unaffected, "\(layer): \(r.evidence)")
        }
    }

    @Test(arguments: Catalogue.payloadLies)
    func plainDriverReportsUndetectedTampering(_ attack: Attack) {
        let dir = directory(attack.name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = PayloadProbe.run(attack, layer: .plain, directory: dir)
        #expect(r.signature == .wrongPayload, "\(attack.name): \(r.evidence)")
        #expect(PayloadProbe.expected(attack, layer: .plain).contains(r.signature))
        // The audit's row (`ringfence audit --target payload`): reported, honestly, as
        // undetected tampering, which is what the catalogue expects of this layer.
        let row = r.payloadRecord(for: attack, layer: .plain)
        #expect(row.outcome == .undetectedTampering)
        #expect(row.outcome.rawValue == "undetected payload tampering")
        #expect(row.asExpected == true)
        #expect(row.evidence.hasPrefix("wrong payload: "), "\(row.evidence)")
    }

    @Test(arguments: Catalogue.payloadLies)
    func verifiedLayerNamesTheLie(_ attack: Attack) {
        let dir = directory(attack.name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = PayloadProbe.run(attack, layer: .verified, directory: dir)
        let expected = PayloadProbe.expected(attack, layer: .verified)
        #expect(expected.count == 1)
        #expect(expected.contains(r.signature), "\(attack.name): got \(r.signature): \(r.evidence)")
        // The audit's row: contained, with the violation that names the lie.
        let row = r.payloadRecord(for: attack, layer: .verified)
        #expect(row.outcome == .contained)
        #expect(row.asExpected == true)
        #expect(row.evidence.hasPrefix("\(expected.first?.description ?? "?"): R3 "), "\(row.evidence)")
    }

    /// A row is only "as expected" for the outcome its layer must give: wrong bytes from
    /// the verified layer, or a violation from the plain driver (which cannot see a
    /// payload lie), are flagged.
    @Test func theWrongOutcomeIsFlagged() throws {
        let attack = try #require(Catalogue.payloadLies.first)
        func result(_ s: Signature) -> ProbeResult {
            ProbeResult(
                signature: s, evidence: "x", seconds: 0, canaryFound: false, neighbourOK: true,
                sharedBytesSearched: 0)
        }
        let leaked = result(.wrongPayload).payloadRecord(for: attack, layer: .verified)
        #expect(leaked.outcome == .undetectedTampering)
        #expect(leaked.asExpected == false)
        let otherViolation = result(.violation("wrongBlock")).payloadRecord(for: attack, layer: .verified)
        #expect(otherViolation.outcome == .contained)
        #expect(otherViolation.asExpected == false)
        let honest = result(.unaffected).payloadRecord(for: attack, layer: .plain)
        #expect(honest.outcome == .unaffected)
        #expect(honest.asExpected == false)
        let report = AuditReport(target: "t", records: [leaked], seconds: 0).markdown
        #expect(
            report.contains(
                "| 1 | `payload-flip-bit` | R3 | undetected payload tampering | 0.00 | wrong payload: x | **NO** |"))
        #expect(report.contains("Unexpected: payload-flip-bit."))
    }
}
