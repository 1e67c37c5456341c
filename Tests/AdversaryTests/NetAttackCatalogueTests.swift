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
