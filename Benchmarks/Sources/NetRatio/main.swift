#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import TrustingNet
import VirtioNet

// net-ratio: the hardened VirtioNetDriver vs the trusting baseline transmitter, 64-byte
// frames, interleaved rounds in one process against two ports of one back-end
// (`ringfence serve-net --socket A --socket B --sink`), split rings, one thread.
//
//   net-ratio HARDENED_SOCKET TRUSTING_SOCKET [SECONDS] [ROUNDS] [SIZE]
let args = CommandLine.arguments
guard args.count >= 3 else {
    print("usage: net-ratio HARDENED_SOCKET TRUSTING_SOCKET [SECONDS] [ROUNDS] [SIZE]")
    exit(2)
}
let seconds = args.count > 3 ? Double(args[3]) ?? 10 : 10
let rounds = args.count > 4 ? Int(args[4]) ?? 10 : 10
let size = args.count > 5 ? Int(args[5]) ?? 64 : 64

var options = VirtioNetDriver.Options()
options.controlQueue = false
options.packedRing = false
let hardened = try VirtioNetDriver.connect(socket: args[1], options: options)
let trusting = try TrustingNetTransmitter.connect(socket: args[2])
let batch = NetFrameBatch(capacity: 32, frameCapacity: max(size, 14))
for i in 0..<32 {
    batch.append(NetTraffic.frame(dst: [2, 0, 0, 0, 0, 1], src: hardened.info.mac, size: size, sequence: UInt64(i)))
}
let pair = hardened.pair(0)

/// Frames posted in `nanoseconds` by `transmit` (spinning, as a poll-mode driver does).
func run(_ nanoseconds: UInt64, _ transmit: () throws -> Int) rethrows -> UInt64 {
    let end = monotonicNanoseconds() + nanoseconds
    var frames: UInt64 = 0
    while monotonicNanoseconds() < end {
        let n = try transmit()
        frames &+= UInt64(n)
        if n == 0 { sched_yield() }
    }
    return frames
}

let slice = UInt64(seconds / Double(rounds) / 2 * 1e9)
var h: UInt64 = 0
var t: UInt64 = 0
for round in 0..<rounds {
    // Alternate which goes first, so neither always follows the other.
    if round % 2 == 0 {
        h &+= try run(slice) { try pair.transmit(batch) }
        t &+= run(slice) { trusting.transmit(batch) }
    } else {
        t &+= run(slice) { trusting.transmit(batch) }
        h &+= try run(slice) { try pair.transmit(batch) }
    }
}
let each = Double(slice) * Double(rounds) / 1e9
let hm = Double(h) / each / 1e6
let tm = Double(t) / each / 1e6
print("| driver | Mpps (\(size)-byte frames, \(rounds) interleaved rounds, \(seconds) s in all) |")
print("|---|---|")
print("| hardened VirtioNetDriver | \((hm * 1000).rounded() / 1000) |")
print("| trusting baseline | \((tm * 1000).rounded() / 1000) |")
print("| ratio hardened / trusting | \((hm / tm * 1000).rounded() / 1000)x |")
hardened.close()
