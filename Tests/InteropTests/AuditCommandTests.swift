import Foundation
import Testing

/// `ringfence audit` and `serve-blk --attack` as a user runs them: real child processes,
/// and for `--target linux-guest` the real Linux 6.1 virtio_blk driver.
@Suite(.serialized)
struct AuditCommandTests {
    static func binary() throws -> String {
        try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
    }

    static func records(_ path: String) throws -> [[String: Any]] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        return try #require(object?["records"] as? [[String: Any]])
    }

    @Test func auditSelfRunsEachAttackInAFreshChild() throws {
        let json = NSTemporaryDirectory() + "rf-audit-self-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: json) }
        let only = "used-id-out-of-range,never-complete,close-mid-io,leak-probe,reply-size-0xffffff"
        let r = try Interop.run([try Self.binary(), "audit", "--only", only, "--json", json])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("| 1 | `used-id-out-of-range` | R3 | contained-with-error |"))
        #expect(r.output.contains("| 3 | `close-mid-io` | R6 | contained-with-error |"))
        #expect(r.output.contains("| 4 | `leak-probe` | R7 | unaffected |"))
        #expect(r.output.contains("Every outcome is the one the catalogue expects."))
        #expect(r.output.contains("audit: attack 5 of 5 (reply-size-0xffffff)"), "progress line")
        let rows = try Self.records(json)
        #expect(rows.map { $0["attack"] as? String } == only.split(separator: ",").map(String.init))
        #expect(rows.allSatisfy { $0["asExpected"] as? Bool == true })
        #expect((rows[1]["seconds"] as? Double ?? 0) < 5, "never-complete detected at its deadline")
    }

    @Test func auditCommandTargetRunsAnyDriverProgram() throws {
        let bin = try Self.binary()
        let r = try Interop.run([
            bin, "audit", "--target", "command", "--only", "used-id-out-of-range,vandal-descriptors", "--",
            bin, "blk", "--socket", "{socket}", "--timeout", "2", "verify", "--size", "64K",
        ])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("| 1 | `used-id-out-of-range` | R3 | contained-with-error |"), "\(r.output)")
        #expect(r.output.contains("exit status 1"))
        #expect(r.output.contains("| 2 | `vandal-descriptors` | R1 | unaffected |"))
    }

    /// A packed attack needs the driver to ack VIRTIO_F_RING_PACKED (serve-blk writes what
    /// it acked to --negotiation-file): `blk` does and is attacked, `blk --no-packed` does
    /// not and the row says "not applicable", never a pass.
    @Test func packedAttackIsNotApplicableToASplitRingDriver() throws {
        let bin = try Self.binary()
        func audit(_ extra: [String]) throws -> (Int32, String) {
            let json = NSTemporaryDirectory() + "rf-audit-na-\(getpid())-\(extra.count).json"
            defer { try? FileManager.default.removeItem(atPath: json) }
            let r = try Interop.run(
                [bin, "audit", "--target", "command", "--only", "packed-used-id-out-of-range", "--json", json, "--"]
                    + [bin, "blk", "--socket", "{socket}", "--timeout", "2"] + extra + ["verify", "--size", "64K"])
            let outcome = try Self.records(json).first?["outcome"] as? String ?? ""
            return (r.status, outcome + "\n" + r.output)
        }
        let (packed, attacked) = try audit([])
        #expect(packed == 0, "\(attacked)")
        #expect(attacked.hasPrefix("contained-with-error\n"), "\(attacked)")
        #expect(attacked.contains("exit status 1"))
        let (split, skipped) = try audit(["--no-packed"])
        #expect(split == 0, "\(skipped)")
        #expect(skipped.hasPrefix("not applicable\n"), "\(skipped)")
        #expect(skipped.contains("not applicable: the driver acked the split ring, not VIRTIO_F_RING_PACKED"))
        #expect(skipped.contains("Not applicable (skipped): packed-used-id-out-of-range."))
    }

    /// Issue 18: `audit --target payload` runs the payload lies against the plain driver
    /// (each row honestly "undetected payload tampering") and against the verified layer
    /// (each row contained, with the violation that names the lie).
    @Test func auditPayloadReportsBothLayers() throws {
        let json = NSTemporaryDirectory() + "rf-audit-payload-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: json) }
        let r = try Interop.run([try Self.binary(), "audit", "--target", "payload", "--json", json])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("## Payload lies against the plain driver"))
        #expect(r.output.contains("| 1 | `payload-flip-bit` | R3 | undetected payload tampering |"), "\(r.output)")
        #expect(r.output.contains("6 attacks against the plain VirtioBlock driver in "))
        #expect(r.output.contains(": 6 undetected payload tampering."))
        #expect(r.output.contains("## Payload lies against the verified layer"))
        #expect(r.output.contains("| 1 | `payload-flip-bit` | R3 | contained-with-error |"), "\(r.output)")
        #expect(r.output.contains("6 attacks against VerifiedBlock over the VirtioBlock driver in "))
        #expect(r.output.contains(": 6 contained-with-error."))
        let data = try Data(contentsOf: URL(fileURLWithPath: json))
        let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        let plain = try #require((object?["plain"] as? [String: Any])?["records"] as? [[String: Any]])
        let verified = try #require((object?["verified"] as? [String: Any])?["records"] as? [[String: Any]])
        let names = [
            "payload-flip-bit", "payload-other-block", "payload-older-version", "payload-rollback",
            "payload-write-dropped", "payload-torn-write",
        ]
        #expect(plain.map { $0["attack"] as? String } == names)
        #expect(verified.map { $0["attack"] as? String } == names)
        #expect(plain.allSatisfy { $0["outcome"] as? String == "undetected payload tampering" })
        #expect(plain.allSatisfy { $0["asExpected"] as? Bool == true })
        #expect(verified.allSatisfy { $0["outcome"] as? String == "contained-with-error" })
        #expect(verified.allSatisfy { $0["asExpected"] as? Bool == true })
        let violations = ["tagMismatch", "wrongBlock", "staleVersion", "rolledBackRoot", "writeNotStored", "tornWrite"]
        for (row, v) in zip(verified, violations) {
            let evidence = row["evidence"] as? String ?? ""
            #expect(evidence.hasPrefix("violation \(v): R3 (validate before use): "), "\(evidence)")
        }
    }

    @Test func auditPayloadRefusesAnUnknownAttack() throws {
        let r = try Interop.run([try Self.binary(), "audit", "--target", "payload", "--only", "used-idx-jump"])
        #expect(r.status != 0)
        #expect(r.output.contains("unknown attack used-idx-jump"), "\(r.output)")
    }

    @Test func serveBlkRefusesUnknownAttacks() throws {
        let r = try Interop.run([
            try Self.binary(), "serve-blk", "--socket", "/tmp/x.sock", "--image", "/tmp/x.img", "--attack", "nope",
        ])
        #expect(r.status != 0)
        #expect(r.output.contains("unknown attack 'nope'"))
    }

    /// A representative subset against Linux 6.1 (one boot each, ~10-15 s; reply-short none).
    static let guestSubset = [
        "status-garbage", "used-len-zero", "vandal-avail", "config-blk-size-0", "reply-short", "leak-probe",
    ]

    @Test(.enabled(if: Interop.qemuAvailable, "qemu-system-x86_64 is not installed: Linux guest audit skipped"))
    func linuxGuestAuditOfARepresentativeSubset() throws {
        #expect(try Interop.buildGuestImage())
        let json = NSTemporaryDirectory() + "rf-audit-guest-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: json) }
        let start = Date()
        let r = try Interop.run([
            try Self.binary(), "audit", "--target", "linux-guest", "--deadline", "30", "--only",
            Self.guestSubset.joined(separator: ","), "--json", json,
        ])
        print(r.output)
        #expect(r.status == 0)
        let rows = try Self.records(json)
        #expect(rows.map { $0["attack"] as? String } == Self.guestSubset)
        let outcome = Dictionary(
            uniqueKeysWithValues: rows.map { ($0["attack"] as? String ?? "", $0["outcome"] as? String ?? "") })
        #expect(!outcome.values.contains("not run"))
        #expect(outcome["status-garbage"] == "I/O error", "Linux fails the request on an unknown status")
        #expect(outcome["used-len-zero"] == "clean", "Linux 6.1 does not check the used length (validation reverted)")
        #expect(outcome["vandal-avail"] == "clean", "Linux never reads the avail ring back")
        #expect(outcome["config-blk-size-0"] == "contained-with-error", "Linux refuses a block size of 0")
        #expect(outcome["reply-short"] == "contained-with-error", "QEMU refuses the short reply")
        #expect(outcome["leak-probe"] == "leaked canary", "vhost-user maps all guest RAM: the canary is in the dump")
        #expect(Date().timeIntervalSince(start) < 120)
    }

    /// A packed attack against Linux: the guest's device gets `packed=on`, Linux acks the
    /// packed ring (the row is not "not applicable"), and 6.1 does not check the used
    /// length on the packed ring either.
    @Test(.enabled(if: Interop.qemuAvailable, "qemu-system-x86_64 is not installed: Linux guest audit skipped"))
    func linuxGuestAuditOfAPackedAttack() throws {
        #expect(try Interop.buildGuestImage())
        let json = NSTemporaryDirectory() + "rf-audit-guest-packed-\(getpid()).json"
        defer { try? FileManager.default.removeItem(atPath: json) }
        let r = try Interop.run([
            try Self.binary(), "audit", "--target", "linux-guest", "--deadline", "30", "--only",
            "packed-used-len-overflow", "--json", json,
        ])
        #expect(r.status == 0, "\(r.output)")
        let rows = try Self.records(json)
        #expect(rows.first?["outcome"] as? String == "clean", "\(r.output)")
        #expect(rows.first?["evidence"] as? String == "I/O script passed; RF-SIZE 131072 512")
    }

    /// `--device net --target linux-guest`: two receive attacks against Linux 6.1
    /// virtio_net, each in its own guest (scripts/guest/net-audit.sh); the rows carry the
    /// guest's own counters and kernel lines.
    @Test(.enabled(if: Interop.qemuAvailable, "qemu-system-x86_64 is not installed: Linux guest audit skipped"))
    func linuxGuestNetAuditOfTwoReceiveAttacks() throws {
        #expect(try Interop.buildGuestImage())
        let r = try Interop.run([
            try Self.binary(), "audit", "--device", "net", "--target", "linux-guest", "--only",
            "net-gso-garbage,net-used-len-below-header",
        ])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("# virtio-net adversary against Linux 6.1 virtio_net (QEMU TCG guest)"))
        #expect(r.output.contains("virtio-net-pci,netdev=n0,vectors=0"), "the command in the report")
        let rows = r.output.split(separator: "\n").filter { $0.hasPrefix("| net-") }
        #expect(rows.count == 2, "\(r.output)")
        let gso = try #require(rows.first { $0.hasPrefix("| net-gso-garbage |") })
        #expect(gso.contains("exited on its own with status 0"), "the guest powered off normally: \(gso)")
        #expect(gso.contains("rx_frame_errors=1"), "\(gso)")
        #expect(gso.contains("bad gso: type: 127"), "\(gso)")
        let short = try #require(rows.first { $0.hasPrefix("| net-used-len-below-header |") })
        #expect(short.contains("rx_length_errors=1"), "\(short)")
    }

    @Test func netAuditRefusesTheTargetsItDoesNotHave() throws {
        let r = try Interop.run([try Self.binary(), "audit", "--device", "net", "--target", "xen-net"])
        #expect(r.status == 2, "\(r.output)")
        #expect(r.output.contains("--device net: targets self, linux-guest and command"), "\(r.output)")
    }
}
