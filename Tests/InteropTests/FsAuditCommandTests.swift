import Foundation
import Testing

/// `ringfence audit --device fs` and `serve-fs --attack` as a user runs them.
@Suite(.serialized)
struct FsAuditCommandTests {
    @Test func fsAuditSelfContainsEveryAttack() throws {
        let bin = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let json = NSTemporaryDirectory() + "rf-audit-fs-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: json) }
        let r = try Interop.run([bin, "audit", "--device", "fs", "--json", json])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("| 5 | `fs-unique-other` | R3 | contained-with-error |"))
        #expect(r.output.contains("Every outcome is the one the catalogue expects."))
        let data = try Data(contentsOf: URL(fileURLWithPath: json))
        let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        let rows = try #require(object?["records"] as? [[String: Any]])
        #expect(rows.count >= 31)
        #expect(rows.allSatisfy { $0["asExpected"] as? Bool == true })
    }

    @Test func fsAuditListsTheCatalogue() throws {
        let bin = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let r = try Interop.run([bin, "audit", "--device", "fs", "--list"])
        #expect(r.status == 0)
        #expect(r.output.contains("fs-readdir-offsets-repeat\tR5\tfs\t"))
    }

    @Test func serveFsRefusesAnUnknownAttack() throws {
        let bin = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let r = try Interop.run([bin, "serve-fs", "--socket", "/tmp/x.sock", "--dir", "/tmp", "--attack", "nope"])
        #expect(r.status == 2)
        #expect(r.output.contains("unknown fs attack 'nope'"))
    }
}
