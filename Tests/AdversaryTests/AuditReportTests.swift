import Adversary
import Foundation
import Testing

@Suite("audit report format")
struct AuditReportTests {
    func sample() throws -> AuditReport {
        let a = try #require(Catalogue.attack(named: "used-id-out-of-range"))
        let b = try #require(Catalogue.attack(named: "never-complete"))
        return AuditReport(
            target: "test driver",
            records: [
                AuditRecord(
                    attack: a, outcome: .contained, seconds: 0.004, evidence: "used id 135 | out of range",
                    asExpected: true, signature: "violation usedIdOutOfRange"),
                AuditRecord(attack: b, outcome: .hung, seconds: 25, evidence: "line one\nline two", asExpected: false),
            ], seconds: 25.5)
    }

    @Test func markdownTableHasOneRowPerAttackAndATally() throws {
        let md = try sample().markdown
        let lines = md.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        #expect(lines[0] == "| # | attack | rule | outcome | detect (s) | evidence | expected |")
        #expect(lines[1] == "|---|---|---|---|---|---|---|")
        #expect(
            lines[2]
                == "| 1 | `used-id-out-of-range` | R3 | contained-with-error | 0.00 | used id 135 \\| out of range | yes |"
        )
        #expect(lines[3] == "| 2 | `never-complete` | R5 | hung past deadline | 25.00 | line one ⏎ line two | **NO** |")
        #expect(lines[5] == "2 attacks against test driver in 25.5 s: 1 contained-with-error, 1 hung past deadline.")
        #expect(lines[6] == "Unexpected: never-complete.")
    }

    @Test func foreignTargetsHaveNoExpectedColumn() throws {
        var r = try sample()
        for i in r.records.indices { r.records[i].asExpected = nil }
        #expect(
            r.markdown.hasPrefix("| # | attack | rule | outcome | detect (s) | evidence |\n|---|---|---|---|---|---|\n")
        )
    }

    @Test func jsonRoundTrips() throws {
        let r = try sample()
        let back = try JSONDecoder().decode(AuditReport.self, from: try r.json())
        #expect(back == r)
        let object = try JSONSerialization.jsonObject(with: try r.json()) as? [String: Any]
        let records = object?["records"] as? [[String: Any]]
        #expect(records?.first?["outcome"] as? String == "contained-with-error")
        #expect(records?.first?["rule"] as? String == "R3")
    }

    @Test func guestConsoleIsClassified() {
        let start = "RINGFENCE-GUEST-START kernel=6.1.0-56-amd64 uptime=2.5\r\n"
        func c(_ body: String, status: Int32 = 0, timedOut: Bool = false) -> Outcome {
            GuestConsole.classify(console: start + body, exitStatus: status, timedOut: timedOut).0
        }
        #expect(c("[ 3.1] BUG: kernel NULL pointer dereference, address: 0000000000000008\r\n") == .kernelOops)
        #expect(c("[ 3.1] Oops: 0000 [#1] PREEMPT SMP\r\n") == .kernelOops)
        #expect(c("[ 9.0] INFO: task dd:71 blocked for more than 5 seconds.\r\n") == .hungTask)
        #expect(c("[ 3.0] virtio_blk virtio0: req.0:id 135 out of range\r\n", timedOut: true) == .hung)
        #expect(c("[ 2.9] I/O error, dev vda, sector 0 op 0x0:(READ)\r\nRF-IO-END ok=1\r\n") == .ioError)
        #expect(c("RF-DATA-MISMATCH\r\nRF-IO-END ok=0\r\n") == .acceptedBadData)
        #expect(c("RF-SIZE 131072 512\r\nRF-DATA-OK\r\nRF-IO-END ok=0\r\n") == .clean)
        #expect(
            GuestConsole.classify(
                console: "qemu-system-x86_64: Failed to read from slave.\n", exitStatus: 1, timedOut: false
            ).0 == .contained)
        let evidence = GuestConsole.classify(
            console: start + "[ 3.0] virtio_blk virtio0: req.0:id 135 out of range\r\n", exitStatus: 124, timedOut: true
        ).1
        #expect(evidence.contains("id 135 out of range"))
    }

    @Test func guestModuleLoadFailureIsNotAFinding() {
        let console = """
            RINGFENCE-GUEST-START kernel=6.1.0-57-cloud-amd64 uptime=1.2\r
            RINGFENCE-GUEST-ERROR: loading module virtio_blk failed\r
            RINGFENCE-GUEST-RESULT: rc=254 uptime=1.3\r
            """
        let (outcome, evidence) = GuestConsole.classify(console: console, exitStatus: 254, timedOut: false)
        #expect(outcome == .notRun)
        #expect(evidence.contains("loading module virtio_blk failed"))
        #expect(GuestConsole.bootedRelease(console: console) == "6.1.0-57-cloud-amd64")
        #expect(GuestConsole.bootedRelease(console: "qemu: Failed to read from slave.\n") == nil)
    }

    @Test func reportNamesTheGuestKernel() throws {
        let text = """
            release=6.1.0-57-cloud-amd64
            source=linux-image-6.1.0-57-cloud-amd64 6.1.192-3
            sha256=1a7ac0c40b10b98353b6f85fa9a0d4f2703287979567e19629d35ad2d777d124
            CONFIG_SWIOTLB=y
            CONFIG_VIRTIO_BLK=m
            CONFIG_INTEL_TDX_GUEST=n
            CONFIG_VIRTIO_BALLOON=m
            """
        var kernel = try #require(GuestKernel(kernelTxt: text))
        #expect(kernel.release == "6.1.0-57-cloud-amd64")
        #expect(kernel.config.count == 4)
        var report = try sample()
        report.kernel = kernel
        let lines = report.markdown.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        #expect(
            lines[0]
                == "Kernel: `6.1.0-57-cloud-amd64`, from linux-image-6.1.0-57-cloud-amd64 6.1.192-3, sha256 `1a7ac0c40b10b983`."
        )
        #expect(lines[1] == "Config: VIRTIO_BLK=m, SWIOTLB=y, INTEL_TDX_GUEST=n (all `CONFIG_VIRTIO*` in the JSON).")
        #expect(lines[2] == "")
        #expect(lines[3] == "| # | attack | rule | outcome | detect (s) | evidence | expected |")
        kernel.booted = "6.1.0-57-amd64"
        #expect(kernel.markdown.contains("(**booted as `6.1.0-57-amd64`**)"))
        report.kernel = kernel
        #expect(try JSONDecoder().decode(AuditReport.self, from: try report.json()) == report)
        #expect(GuestKernel(kernelTxt: "source=x\n") == nil)
        #expect(GuestKernel(kernelTxt: "release=r\nconfig=unknown\n")?.markdown.contains("Config: unknown") == true)
    }
}
