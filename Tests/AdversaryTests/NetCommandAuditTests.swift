import Adversary
import Testing

/// The harness behind `audit --device net --target command`: what it reports for a
/// program that leaves early, ignores the stop request, or crashes.
@Suite struct NetCommandAuditTests {
    let attack = NetCatalogue.all[0]

    @Test func programThatLeavesEarlyIsReportedSo() {
        let r = NetCommandAudit.run([attack], command: ["/bin/sh", "-c", "exit 3"], seconds: 1, stopSeconds: 1)
        #expect(r.first?.effect.hasPrefix("exited on its own with status 3") == true, "\(r.first?.effect ?? "")")
        #expect(r.first?.effect.contains("never started") == true, "it never connected")
    }

    @Test func programThatIgnoresTheStopRequestIsAHang() {
        let r = NetCommandAudit.run(
            [attack], command: ["/bin/sh", "-c", "exec sleep 30"], seconds: 0.2, stopSeconds: 0.5)
        #expect(r.first?.effect.hasPrefix("hung") == true, "\(r.first?.effect ?? "")")
        #expect(r.first?.safe == false)
    }

    @Test func programKilledByASignalIsACrash() {
        let r = NetCommandAudit.run([attack], command: ["/bin/sh", "-c", "kill -SEGV $$"], seconds: 1, stopSeconds: 1)
        #expect(r.first?.effect.hasPrefix("crashed: killed by signal 11") == true, "\(r.first?.effect ?? "")")
        #expect(r.first?.safe == false)
    }
}
