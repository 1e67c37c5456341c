// xen-bench: the hardened XenRing frontend against a trusting C frontend built on the
// libxen-dev header macros (Sources/CXenTrusting), same backend process, same run, 4 KiB.
// The trusting baseline lives only in this benchmark package (R8). Usage (in Benchmarks/):
//   swift build -c release --product xen-bench
//   .build/release/xen-bench [--seconds S] [--rounds N] [--depth D] [--write] [--only hardened|trusting]
//                            [--wait interrupts|adaptive|poll]
// The trusting C frontend blocks on the event channel (poll(2)) whenever the ring is empty, so
// the like-for-like comparison, and the default, runs the hardened frontend with the same wait
// (`--wait interrupts`); `adaptive` (the library's default) and `poll` spin first and are
// not a comparison of the two frontends' per-request cost.
#if canImport(Glibc)
import Glibc
#endif
import BlockBench
import CXenTrusting
import RingTestSupport
import SharedMemory
import XenRing

let diskSectors = 65536  // 32 MiB in memory

/// The backend process, killed on every way out (exit() skips top-level defers).
nonisolated(unsafe) var backendChild: ChildProcess?

func fail(_ message: String) -> Never {
    print("xen-bench: \(message)")
    backendChild?.kill()
    exit(2)
}

func serveBackend(socket: String) -> Never {
    guard let listener = try? UnixListener(path: socket) else { fail("cannot listen on \(socket)") }
    let storage = MemoryStorage(sectors: diskSectors)
    while true {
        guard let channel = try? listener.accept(until: .after(seconds: 60)) else { exit(0) }
        if let c = try? XenBlkBackendConnection.accept(channel: channel, storage: storage) {
            _ = c.run(idleTimeout: 60)
        }
    }
}

var arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "backend", arguments.count == 2 { serveBackend(socket: arguments[1]) }
var seconds = 1.0
var rounds = 10
var depth = 16
var write = false
var only: String?  // "hardened" or "trusting": one side only, for profiling
var wait = WaitStrategy.spin(nanoseconds: 0)  // interrupts only, as the trusting C frontend waits
while !arguments.isEmpty {
    let a = arguments.removeFirst()
    switch a {
    case "--seconds":
        seconds = Double(arguments.first ?? "") ?? seconds
        arguments = Array(arguments.dropFirst())
    case "--rounds":
        rounds = Int(arguments.first ?? "") ?? rounds
        arguments = Array(arguments.dropFirst())
    case "--depth":
        depth = Int(arguments.first ?? "") ?? depth
        arguments = Array(arguments.dropFirst())
    case "--write": write = true
    case "--only":
        only = arguments.first
        arguments = Array(arguments.dropFirst())
    case "--wait":
        switch arguments.first {
        case "interrupts": wait = .spin(nanoseconds: 0)
        case "adaptive": wait = .adaptive
        case "poll": wait = .poll
        default: fail("--wait takes interrupts, adaptive or poll")
        }
        arguments = Array(arguments.dropFirst())
    default: fail("unknown argument \(a)")
    }
}
depth = max(1, min(depth, 32))

func fmt(_ v: Double, _ d: Int) -> String {
    var scale = 1.0
    for _ in 0..<d { scale *= 10 }
    let n = Int((v * scale).rounded())
    let whole = n / Int(scale)
    let frac = n % Int(scale)
    if d == 0 { return "\(whole)" }
    let f = String(frac)
    return "\(whole)." + String(repeating: "0", count: d - f.count) + f
}

let socket = "/tmp/xen-bench-\(getpid()).sock"
let child: ChildProcess
do { child = try ChildProcess(executable: currentExecutablePath(), arguments: ["backend", socket]) } catch {
    fail("spawn: \(error)")
}
backendChild = child
defer { child.kill() }

func connect() -> XenBlkFrontendDevice {
    for _ in 0..<200 {
        if let ch = try? UnixChannel.connect(path: socket) {
            do { return try XenBlkFrontendDevice.connect(channel: ch) } catch { fail("handshake: \(error)") }
        }
        usleep(10_000)
    }
    fail("backend did not come up")
}

print(
    "xen-bench: 4 KiB \(write ? "writes" : "reads"), depth \(depth), hardened wait \(wait), \(fmt(seconds, 1)) s per run, \(rounds) rounds; backend pid \(child.pid)"
)
var ratios: [Double] = []
var hardenedTotal = 0.0
var trustingTotal = 0.0
/// CPU seconds (user + system) this process (one busy thread) has used: the frontend's own cost, which
/// other load on the machine disturbs far less than throughput.
func threadCPUSeconds() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)  // the parent has one busy thread
    return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}
var cpuHardened = 0.0
var cpuTrusting = 0.0
var requestsHardened = 0
var requestsTrusting = 0

/// The hardened frontend: the library's benchmark loop (`BlockBench`, what `ringfence
/// xen-blk bench` runs).
@MainActor func runHardened() -> BlockBenchReport<XenBlkError> {
    let device = connect()
    device.wait = wait
    defer { device.disconnect() }
    do {
        let cpu = threadCPUSeconds()
        let bench = BlockBench(
            pattern: write ? .write : .read, blockSize: 4096, depth: depth, seconds: seconds,
            blocks: device.info.sectors / 8)
        let r = bench.run(device)
        if let error = r.firstError { throw error }
        cpuHardened += threadCPUSeconds() - cpu
        requestsHardened += r.requests
        guard r.errors == 0 else { fail("hardened run had \(r.errors) errors") }
        return r
    } catch { fail("hardened: \(error)") }
}

/// The trusting C frontend on the same kind of connection, for `requests` requests;
/// returns requests per second.
@MainActor func runTrusting(requests: Int) -> Double {
    let other = connect()
    defer { other.disconnect() }
    let g = other.front.memory.grants
    var env = xen_trusting_env(
        sring: g.page(other.front.memory.ringFrame), gnttab: g.entries, gnttab_entries: UInt32(g.entryCount),
        frames: g.frames, nr_frames: UInt32(g.frameCount), evt_to_peer: other.events.outgoing.fileDescriptor,
        evt_from_peer: other.events.incoming.fileDescriptor)
    let data = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
    defer { data.deallocate() }
    data.initializeMemory(as: UInt8.self, repeating: 0x5a, count: 4096)
    var errors: UInt64 = 0
    let cpu = threadCPUSeconds()
    let start = monotonicNanoseconds()
    let n = xen_trusting_front_run(
        &env, 64, 1, UInt64(requests), UInt32(depth), write ? 1 : 0, UInt64(diskSectors),
        data.assumingMemoryBound(to: UInt8.self), 5000, &errors)
    let elapsed = Double(monotonicNanoseconds() - start) / 1e9
    cpuTrusting += threadCPUSeconds() - cpu
    requestsTrusting += n
    guard n == requests, errors == 0 else { fail("trusting C run: \(n) completed, \(errors) errors") }
    return Double(n) / elapsed
}

if let only {
    for _ in 1...rounds {
        if only == "hardened" {
            let r = runHardened()
            print("hardened \(fmt(r.requestsPerSecond, 0)) IOPS, \(r.requests) requests")
        } else {
            let n = Int(1_000_000 * seconds)
            print("trusting \(fmt(runTrusting(requests: n), 0)) IOPS, \(n) requests")
        }
    }
    child.kill()
    exit(0)
}
for round in 1...rounds {
    // Alternate which side goes first (ABBA), so drift in machine load cancels out.
    var r = BlockBenchReport<XenBlkError>()
    var cRate = 0.0
    if round % 2 == 1 {
        r = runHardened()
        cRate = runTrusting(requests: r.requests)
    } else {
        let probe = Int(
            max(1000, (Double(ratios.isEmpty ? 100_000 : Int(hardenedTotal / Double(round - 1))) * seconds)))
        cRate = runTrusting(requests: probe)
        r = runHardened()
    }
    let ratio = r.requestsPerSecond / cRate
    ratios.append(ratio)
    hardenedTotal += r.requestsPerSecond
    trustingTotal += cRate
    print(
        "round \(round): hardened Swift \(fmt(r.requestsPerSecond, 0)) IOPS (\(fmt(r.mebibytesPerSecond, 1)) MiB/s), "
            + "trusting C \(fmt(cRate, 0)) IOPS, ratio \(fmt(ratio, 3))")
}
let usHardened = cpuHardened / Double(max(1, requestsHardened)) * 1e6
let usTrusting = cpuTrusting / Double(max(1, requestsTrusting)) * 1e6
print(
    "frontend CPU per request: hardened \(fmt(usHardened, 3)) us, trusting \(fmt(usTrusting, 3)) us "
        + "(ratio \(fmt(usTrusting / usHardened, 3)))")
let sorted = ratios.sorted()
print(
    "median ratio hardened/trusting: \(fmt(sorted[sorted.count / 2], 3)) "
        + "(mean IOPS hardened \(fmt(hardenedTotal / Double(rounds), 0)), trusting \(fmt(trustingTotal / Double(rounds), 0)))"
)
