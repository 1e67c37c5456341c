import Adversary
import Testing
import VirtioNet

/// Every attack of the net section, run against our net driver: the outcome is one the
/// catalogue expects, and the probe ends in bounded time.
@Suite struct NetAttackCatalogueTests {
    @Test(arguments: NetCatalogue.all)
    func attackIsContained(attack: NetAttack) {
        let r = NetDriverProbe.run(attack)
        #expect(attack.expected.contains(r.signature), "\(attack.name): \(r.signature): \(r.evidence)")
        #expect(r.milliseconds < 10_000, "\(attack.name) took \(r.milliseconds) ms")
    }

    @Test func namesAreUnique() {
        #expect(Set(NetCatalogue.all.map(\.name)).count == NetCatalogue.all.count)
    }
}

/// The ring-level lies of the net section, each on a split and on a packed ring: the exact
/// outcome, not just one of the expected set.
@Suite struct NetRingAttackTests {
    static let cases: [(String, Bool, Signature)] = [
        ("net-used-id-out-of-range", false, .violation("usedIdOutOfRange")),
        ("net-used-id-out-of-range", true, .violation("usedIdOutOfRange")),
        ("net-used-id-duplicate", false, .violation("usedIdNotInFlight")),
        ("net-used-id-duplicate", true, .violation("usedIdNotInFlight")),
        ("net-descriptor-rewritten-after-post", false, .unaffected),
        ("net-descriptor-rewritten-after-post", true, .unaffected),
    ]

    @Test(arguments: cases)
    func ringLieHasItsExactOutcome(name: String, packed: Bool, outcome: Signature) throws {
        let attack = try #require(NetCatalogue.attack(named: name))
        let r = NetDriverProbe.run(attack, packed: packed)
        #expect(r.signature == outcome, "\(name) packed=\(packed): \(r.signature): \(r.evidence)")
        #expect(r.milliseconds < 10_000)
        if outcome == .unaffected {
            #expect(r.evidence.hasPrefix("5 of 5 frames intact"), "\(r.evidence)")
            // The lie was told: on a split ring the descriptor was rewritten (a packed ring has no next).
            #expect(r.evidence.hasSuffix("; 1 posted descriptor rewritten") == !packed, "\(r.evidence)")
        }
    }

    @Test func ringAttacksAreInTheNetSection() {
        #expect(NetCatalogue.ringAttacks.allSatisfy { NetCatalogue.all.contains($0) })
        #expect(NetCatalogue.all.count == 25)
    }
}
