import Adversary
import Foundation

/// `ringfence demo`'s payload step: each payload lie of the catalogue against the plain
/// driver (passes undetected, as §1 allows) and the verified layer (caught and named).
/// Returns false if an outcome was not the expected one.
func demoPayloadLies(directory: String) -> Bool {
    var allExpected = true
    print("| payload lie | plain driver | verified layer |")
    print("|---|---|---|")
    for attack in Catalogue.payloadLies {
        var cells: [String] = []
        for layer in PayloadProbe.Layer.allCases {
            let dir = directory + "/\(attack.name)-\(layer)"
            let r = PayloadProbe.run(attack, layer: layer, directory: dir)
            try? FileManager.default.removeItem(atPath: dir)
            let ok = PayloadProbe.expected(attack, layer: layer).contains(r.signature)
            allExpected = allExpected && ok
            switch (layer, r.signature) {
            case (.plain, .wrongPayload): cells.append("undetected: wrong bytes returned with status OK")
            case (.verified, .violation(let name)): cells.append("caught: \(name)")
            default: cells.append("\(r.signature)\(ok ? "" : " (NOT as expected)")")
            }
        }
        print("| \(attack.name) | \(cells.joined(separator: " | ")) |")
    }
    return allExpected
}
