import Testing

@testable import VerifiedBlock

@Suite("VerifiedBlock: the Merkle tree")
struct MerkleTreeTests {
    func leaf(_ i: Int, _ v: UInt64) -> [UInt8] {
        MerkleTree.leaf(
            block: UInt64(i), version: v, slot: Int(v % 2), tag: [UInt8](repeating: UInt8(v & 0xff), count: 16))
    }

    /// Paths recomputed lazily (once per flush) give the root a fresh tree of the same leaves gives.
    @Test(arguments: [1, 2, 7, 100, 257])
    func lazyRootEqualsAFreshTree(count: Int) {
        var leaves = (0..<count).map { leaf($0, 0) }
        var tree = MerkleTree(leaves: leaves)
        var rng = SystemRandomNumberGenerator()
        for round in 1...5 {
            for _ in 0..<(round * 3) {
                let i = Int.random(in: 0..<count, using: &rng)
                let l = leaf(i, UInt64.random(in: 1...1000, using: &rng))
                leaves[i] = l
                tree.update(i, leaf: l)
            }
            var fresh = MerkleTree(leaves: leaves)
            #expect(tree.root() == fresh.root())
        }
        var other = leaves
        other[count - 1] = leaf(count - 1, 5000)
        var changed = MerkleTree(leaves: other)
        #expect(changed.root() != tree.root())
    }
}
