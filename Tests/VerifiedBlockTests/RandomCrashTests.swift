import Foundation
import Testing

@testable import VerifiedBlock

/// Random writes, flushes and crashes (the back-end stops in the middle of a batch, the
/// request it was writing torn at a random 512-byte boundary), checked against a model:
/// after every recovery each block holds its flushed content or one written since.
@Suite("VerifiedBlock: randomized crashes against a model")
struct RandomCrashTests {
    struct Mix: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9e37_79b9_7f4a_7c15
            var z = state
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            return z ^ (z >> 31)
        }
    }

    func content(_ b: UInt64, _ gen: Int) -> [UInt8] {
        gen == 0 ? [UInt8](repeating: 0, count: 4096) : block(UInt8(truncatingIfNeeded: gen &* 7 &+ Int(b)))
    }

    @Test(arguments: [1, 2, 3, 4, 5, 6, 7, 8] as [UInt64])
    func everyBlockOldOrNewAfterEveryCrash(seed: UInt64) throws {
        var rng = Mix(state: seed)
        let bed = Bed(capacity: 24 * 9216 + 4096)
        var device = try bed.format()
        let n = device.blocks
        var durable = [Int](repeating: 0, count: Int(n))
        var since = [Set<Int>](repeating: [], count: Int(n))
        var gen = 0
        for _ in 0..<60 {
            switch Int.random(in: 0..<10, using: &rng) {
            case 0..<6:
                let count = Int.random(in: 1...6, using: &rng)
                var list: [UInt64] = []
                while list.count < count {
                    let b = UInt64.random(in: 0..<n, using: &rng)
                    if !list.contains(b) { list.append(b) }
                }
                gen += 1
                for b in list { since[Int(b)].insert(gen) }
                try list.flatMap { content($0, gen) }.withUnsafeBytes {
                    try device.write(blocks: list, from: $0)
                }
            case 6..<8:
                try device.flush()
                for b in 0..<Int(n) where !since[b].isEmpty {
                    durable[b] = since[b].max() ?? durable[b]
                    since[b] = []
                }
            default:
                // Crash in the middle of the next write batch.
                let count = Int.random(in: 1...6, using: &rng)
                var list: [UInt64] = []
                while list.count < count {
                    let b = UInt64.random(in: 0..<n, using: &rng)
                    if !list.contains(b) { list.append(b) }
                }
                gen += 1
                for b in list { since[Int(b)].insert(gen) }
                let tornAt = Int.random(in: 0..<count, using: &rng)
                let keep = 512 * Int.random(in: 0...9, using: &rng)
                var seen = 0
                let store = bed.transport
                store.onWrite = { offset, data in
                    defer { seen += 1 }
                    if seen < tornAt { return true }
                    if seen == tornAt && keep > 0 {
                        store.bytes.withUnsafeMutableBytes { disk in
                            UnsafeMutableRawBufferPointer(rebasing: disk[Int(offset)..<Int(offset) + keep])
                                .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[0..<keep]))
                        }
                    }
                    return false
                }
                try list.flatMap { content($0, gen) }.withUnsafeBytes {
                    try device.write(blocks: list, from: $0)
                }
                store.onWrite = nil
                device = try bed.open()
                for b in 0..<n {
                    let got = try device.read(block: b, count: 1)
                    let allowed = [durable[Int(b)]] + Array(since[Int(b)])
                    guard let which = allowed.first(where: { content(b, $0) == got }) else {
                        Issue.record("seed \(seed): block \(b) holds none of generations \(allowed)")
                        return
                    }
                    durable[Int(b)] = which
                    since[Int(b)] = []
                }
            }
        }
    }
}
