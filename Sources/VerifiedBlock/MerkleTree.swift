import Crypto

/// SHA-256 helpers with domain separation (leaf 0x00, node 0x01), one place.
enum Hash {
    static func sha256(_ parts: [UInt8]...) -> [UInt8] {
        var h = SHA256()
        for p in parts { h.update(data: p) }
        return Array(h.finalize())
    }

    static func sha256(_ buffer: UnsafeRawBufferPointer) -> [UInt8] {
        var h = SHA256()
        h.update(bufferPointer: buffer)
        return Array(h.finalize())
    }
}

/// A binary Merkle tree over the blocks' (index, version, slot, tag), kept whole in private
/// memory once it has been checked against the anchored root: every node is verified once,
/// at open. A write replaces its leaf; the paths above changed leaves are recomputed when
/// the root is next asked for (at a flush), each inner node once however many of its
/// leaves changed.
struct MerkleTree {
    let leafCount: Int
    let width: Int
    /// Node k at bytes k*32 ..< k*32+32; the root is node 1, leaf i is node width+i.
    private var nodes: [UInt8]
    /// Leaves replaced since the root was last computed.
    private var dirty: [Int] = []

    init(leaves: [[UInt8]]) {
        leafCount = leaves.count
        var w = 1
        while w < max(1, leaves.count) { w <<= 1 }
        width = w
        nodes = [UInt8](repeating: 0, count: 2 * w * 32)
        for (i, leaf) in leaves.enumerated() { nodes.put(leaf, at: (w + i) * 32) }
        var k = w - 1
        while k >= 1 {
            recompute(k)
            k -= 1
        }
    }

    static func leaf(block: UInt64, version: UInt64, slot: Int, tag: [UInt8]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 1 + 8 + 8 + 1 + 16)
        b[0] = 0
        b.putLE(block, at: 1)
        b.putLE(version, at: 9)
        b[17] = UInt8(truncatingIfNeeded: slot)
        b.put(tag, at: 18)
        return Hash.sha256(b)
    }

    private mutating func recompute(_ k: Int) {
        let digest = nodes.withUnsafeBytes { all -> [UInt8] in
            var h = SHA256()
            h.update(data: [UInt8(1)])
            h.update(bufferPointer: UnsafeRawBufferPointer(rebasing: all[(2 * k * 32)..<(2 * k * 32 + 64)]))
            return Array(h.finalize())
        }
        nodes.put(digest, at: k * 32)
    }

    mutating func update(_ i: Int, leaf: [UInt8]) {
        nodes.put(leaf, at: (width + i) * 32)
        dirty.append(width + i)
    }

    /// The root over every leaf as it is now.
    mutating func root() -> [UInt8] {
        var level = dirty
        dirty.removeAll()
        // All dirty nodes of one level sit at the same depth: go up level by level.
        while let first = level.first, first > 1 {
            level = Array(Set(level.map { $0 / 2 }))
            for k in level { recompute(k) }
        }
        return nodes.slice(32, 32)
    }
}
