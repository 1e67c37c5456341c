import Adversary
import Foundation
import Testing
import VirtioBlock

/// Every attack of the catalogue against our driver, through the real back-end and blk
/// device (hooks), with a healthy second device in the same process and a private canary.
@Suite("adversary catalogue against our driver", .serialized)
struct AttackCatalogueTests {
    static let settings = DriverProbe.Settings()

    @Test func catalogueHasThirtyNamedAttacksCoveringEveryGroup() {
        #expect(Catalogue.all.count >= 30)
        #expect(Catalogue.all.count == 59, "the count docs/audit-ringfence.md states: 50 split + 9 packed")
        #expect(Set(Catalogue.names).count == Catalogue.all.count, "names are unique")
        #expect(Set(Catalogue.all.map(\.group)) == Set(AttackGroup.allCases))
        for a in Catalogue.all {
            #expect(!a.expected.isEmpty && !a.summary.isEmpty && !a.expectation.isEmpty, "\(a.name)")
            #expect(a.name.allSatisfy { $0.isLowercase || $0.isNumber || "-^".contains($0) }, "\(a.name)")
        }
        #expect(Catalogue.attack(named: "used-id-out-of-range")?.rule.rawValue == "R3")
        #expect(throws: Catalogue.UnknownAttack.self) { try Catalogue.select(["used-id-out-of-range,nope"]).get() }
        #expect(
            (try? Catalogue.select(["reply-short,reply-never"]).get().map(\.name)) == ["reply-short", "reply-never"])
    }

    @Test(arguments: Catalogue.all)
    func attackIsContained(_ attack: Attack) throws {
        let dir = NSTemporaryDirectory() + "rf-adv-\(getpid())-\(attack.name)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = DriverProbe.run(attack, settings: Self.settings, directory: dir)
        #expect(attack.expected.contains(r.signature), "\(attack.name): got \(r.signature): \(r.evidence)")
        #expect(!r.canaryFound, "private canary found in \(r.sharedBytesSearched) bytes of shared memory (R7)")
        #expect(r.sharedBytesSearched > 0 || r.signature != .unaffected, "the shared memory was searched")
        #expect(r.neighbourOK, "a second device of the same process was disturbed (R6)")
        // Detected within the deadline: the request timeout, plus the slack of one round.
        #expect(r.seconds < Self.settings.requestTimeout * 2 + 1, "took \(r.seconds) s")
    }

    /// The exact violation values for the used-ring family (not only the case names).
    @Test func usedRingViolationsCarryTheirValues() {
        func evidence(_ name: String) -> String {
            guard let a = Catalogue.attack(named: name) else { return "" }
            let dir = NSTemporaryDirectory() + "rf-adv-v-\(getpid())-\(name)"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            return DriverProbe.run(a, directory: dir).evidence
        }
        #expect(evidence("used-id-out-of-range").contains("used id 135 is outside the queue of 128 descriptors"))
        #expect(evidence("used-idx-backwards").contains("went backwards from 1 to 0"))
        #expect(evidence("used-len-overflow").contains("used len 4097 for id 0 exceeds the 1 writable bytes"))
        #expect(evidence("memfd-resize").contains("ftruncate(0): EPERM, ftruncate(2x): EPERM"))
        #expect(evidence("notification-storm").contains("device sent 250000 notifications"))
    }

    /// Issue 13's device-side forms: what a peer shares besides the rings (descriptor flags
    /// and counters, what it attaches, the control socket's pace) costs a typed error
    /// within the control deadline, never a hang.
    @Test func sharedDescriptorAndPaceAttacksEndWithTheExactErrorInTime() {
        func run(_ name: String) -> ProbeResult? {
            guard let a = Catalogue.attack(named: name) else { return nil }
            let dir = NSTemporaryDirectory() + "rf-adv-s-\(getpid())-\(name)"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            return DriverProbe.run(a, settings: Self.settings, directory: dir)
        }
        let kick = run("kick-fd-blocking-saturated")
        #expect(kick?.signature == .violation("notifierBlocked"))
        #expect(kick?.evidence.contains("the peer made a write to the shared kick eventfd block") == true)
        #expect((kick?.seconds ?? 99) < 1, "freed by the watchdog, not by the device")
        let call = run("call-fd-blocking-saturated")
        #expect(call?.signature == .timeout)
        #expect((call?.seconds ?? 99) < Self.settings.requestTimeout + 1)
        for name in ["reply-with-pipe", "reply-with-memfd"] {
            #expect(run(name)?.evidence.contains("GET_FEATURES carries 1 descriptors, expected 0") == true, "\(name)")
        }
        // One bound for the whole connect: 0.8 s per reply fits each 1 s message deadline,
        // and the connect (a dozen messages) still ends at 1 s.
        let slow = run("replies-just-in-time")
        #expect(slow?.signature == .timeout)
        #expect((slow?.seconds ?? 99) < Self.settings.controlTimeout + 0.5)
        let deaf = run("requests-never-read")
        #expect(deaf?.signature == .timeout)
        #expect((deaf?.seconds ?? 99) < Self.settings.controlTimeout + 0.5)
    }

    @Test func healthyDeviceIsUnaffectedAndSharesNoCanary() {
        let dir = NSTemporaryDirectory() + "rf-adv-none-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = DriverProbe.run(nil, directory: dir)
        #expect(r.signature == .unaffected)
        #expect(!r.canaryFound && r.neighbourOK)
        #expect(r.sharedBytesSearched > 1 << 20)
    }

    @Test func canarySearchFindsWhatIsThere() {
        let hay: [UInt8] = [1, 2, 0xc4, 9, 0xc4, 7, 7, 3]
        #expect(DriverProbe.contains(hay, [0xc4, 7, 7]))
        #expect(!DriverProbe.contains(hay, [0xc4, 7, 8]))
        #expect(!DriverProbe.contains([], [1]))
    }
}
