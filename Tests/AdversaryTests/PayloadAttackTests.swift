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
    }

    @Test(arguments: Catalogue.payloadLies)
    func verifiedLayerNamesTheLie(_ attack: Attack) {
        let dir = directory(attack.name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = PayloadProbe.run(attack, layer: .verified, directory: dir)
        let expected = PayloadProbe.expected(attack, layer: .verified)
        #expect(expected.count == 1)
        #expect(expected.contains(r.signature), "\(attack.name): got \(r.signature): \(r.evidence)")
    }
}
