// xen-net-bench: the hardened XenRing netfront against a trusting C netfront built on the
// libxen-dev header macros (Sources/CXenNetTrusting), same loopback netback process, same
// run, 64-byte and 1500-byte frames echoed (tx then rx). The trusting baseline lives only
// in this benchmark package (R8). Usage (in Benchmarks/):
//   swift build -c release --product xen-net-bench
//   .build/release/xen-net-bench [--seconds S] [--rounds N] [--depth D] [--size BYTES]... [--only hardened|trusting]
//                                [--no-pin] [--lockstep] [--post-max N]
// The frontend (either) runs pinned to CPU 0 and the backend process to CPU 1 unless
// --no-pin: the scheduler then cannot stack them on one core for part of a round.
// Both frontends post and kick before they copy the received frames out, so the backend
// works meanwhile (the hardened one through `XenNetFrontendDevice.exchange`); --lockstep
// runs both in the order before (post, reap, copy out, and only the next pass posts), for
// comparison. --post-max N: at most N frames posted (and kicked) per pass, in both loops
// (default: the depth; not with --lockstep, whose loops post up to the depth).
// Besides the ratios it prints each side's frontend CPU per frame, the backend's serving
// thread's CPU per frame (/proc/PID/task/PID/schedstat) and how often per 1000 frames the
// frontend thread and the backend's serving thread went to sleep (voluntary context
// switches: getrusage(RUSAGE_THREAD), /proc/PID/status), for both frontends.
#if canImport(Glibc)
import Glibc
#endif
import CXenNetTrusting
import SharedMemory
import XenRing

nonisolated(unsafe) var backendChild: ChildProcess?

func fail(_ message: String) -> Never {
    print("xen-net-bench: \(message)")
    backendChild?.kill()
    exit(2)
}

func serveBackend(socket: String) -> Never {
    guard let listener = try? UnixListener(path: socket) else { fail("cannot listen on \(socket)") }
    while true {
        guard let channel = try? listener.accept(until: .after(seconds: 60)) else { exit(0) }
        if let c = try? XenNetBackendConnection.accept(channel: channel, mode: .loopback) {
            _ = c.run(idleTimeout: 60)
        }
    }
}

var arguments = Array(CommandLine.arguments.dropFirst())
if arguments.first == "backend", arguments.count == 3 {
    if arguments[2] == "pin" { _ = xen_net_bench_pin(1) }
    serveBackend(socket: arguments[1])
}
var seconds = 1.0
var rounds = 6
var depth = 32
var sizes: [Int] = []
var only: String?  // "hardened" or "trusting": one side only, for profiling
var pin = true
var lockstep = false
var postMax = 0
while !arguments.isEmpty {
    let a = arguments.removeFirst()
    let value = arguments.first ?? ""
    switch a {
    case "--no-pin":
        pin = false
        continue
    case "--lockstep":
        lockstep = true
        continue
    case "--seconds": seconds = Double(value) ?? seconds
    case "--rounds": rounds = Int(value) ?? rounds
    case "--depth": depth = Int(value) ?? depth
    case "--size": sizes.append(Int(value) ?? 64)
    case "--only": only = value
    case "--post-max": postMax = Int(value) ?? postMax
    default: fail("unknown argument \(a)")
    }
    arguments = Array(arguments.dropFirst())
}
depth = max(1, min(depth, 32))
postMax = postMax <= 0 ? depth : min(postMax, depth)
if sizes.isEmpty { sizes = [64, 1500] }
sizes = sizes.map { max(14, min($0, 4096)) }

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

/// CPU seconds (user + system) this process has used: it runs one busy thread, the
/// frontend, so this is the frontend's own cost, which other load disturbs far less
/// than throughput.
func processCPUSeconds() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}
/// Times this thread (the frontend) went to sleep: its voluntary context switches.
func frontendSleeps() -> Int {
    var u = rusage()
    getrusage(1, &u)  // RUSAGE_THREAD (needs _GNU_SOURCE, not imported)
    return u.ru_nvcsw
}

/// Times the backend's serving thread (its main thread) went to sleep, from
/// /proc/PID/status (voluntary_ctxt_switches of that one task).
func backendSleeps() -> Int {
    guard let f = fopen("/proc/\(backendChild?.pid ?? 0)/status", "r") else { return 0 }
    defer { fclose(f) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, 256, f) != nil {
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if text.hasPrefix("voluntary_ctxt_switches:") {
            return Int(String(text.dropFirst(24).filter(\.isNumber))) ?? 0
        }
    }
    return 0
}
/// Nanoseconds the backend's serving thread (its main thread) has run on a CPU, from
/// /proc/PID/task/PID/schedstat (its first field): what each frontend makes the backend do.
func backendRunNanoseconds() -> Int {
    let pid = backendChild?.pid ?? 0
    guard let f = fopen("/proc/\(pid)/task/\(pid)/schedstat", "r") else { return 0 }
    defer { fclose(f) }
    var line = [CChar](repeating: 0, count: 128)
    guard fgets(&line, 128, f) != nil else { return 0 }
    let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return Int(text.prefix { $0 != " " }) ?? 0
}
nonisolated(unsafe) var backendNanosHardened = 0
nonisolated(unsafe) var backendNanosTrusting = 0
nonisolated(unsafe) var sleepsHardened = (frontend: 0, backend: 0)
nonisolated(unsafe) var sleepsTrusting = (frontend: 0, backend: 0)
nonisolated(unsafe) var cpuHardened = 0.0
nonisolated(unsafe) var cpuTrusting = 0.0
nonisolated(unsafe) var framesHardened = 0
nonisolated(unsafe) var framesTrusting = 0

let socket = "/tmp/xen-net-bench-\(getpid()).sock"
let child: ChildProcess
if pin, xen_net_bench_pin(0) != 0 { fail("cannot pin to CPU 0") }
do {
    child = try ChildProcess(executable: currentExecutablePath(), arguments: ["backend", socket, pin ? "pin" : "-"])
} catch {
    fail("spawn: \(error)")
}
backendChild = child
defer { child.kill() }

func connect() -> XenNetFrontendDevice {
    for _ in 0..<200 {
        if let ch = try? UnixChannel.connect(path: socket) {
            do { return try XenNetFrontendDevice.connect(channel: ch) } catch { fail("handshake: \(error)") }
        }
        usleep(10_000)
    }
    fail("backend did not come up")
}

/// The hardened netfront (what `ringfence xen-net bench` runs): `depth` frames in flight,
/// every echo copied out validated, received and reaped in batches; returns frames echoed per second and their count.
@MainActor func runHardened(size: Int) -> (Double, Int) {
    let device = connect()
    defer { device.disconnect() }
    let frame = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
    defer { frame.deallocate() }
    frame.initializeMemory(as: UInt8.self, repeating: 0x5a)
    let bytes = UnsafeRawBufferPointer(frame)
    let out = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 64)
    defer { out.deallocate() }
    let results = UnsafeMutableBufferPointer<NetReceivedFrame>.allocate(capacity: 64)
    defer { results.deallocate() }
    let list = UnsafeMutableBufferPointer<UnsafeRawBufferPointer>.allocate(capacity: depth)
    defer { list.deallocate() }
    list.initialize(repeating: bytes)
    var received = 0
    let depth = depth  // locals: a global in the loop costs a dynamic exclusivity check each time
    let chunk = UnsafeBufferPointer(rebasing: list[0..<postMax])
    let cpu = processCPUSeconds()
    let (slept, backendSlept) = (frontendSleeps(), backendSleeps())
    let backendRan = backendRunNanoseconds()
    let start = monotonicNanoseconds()
    let end = start &+ UInt64(seconds * 1e9)
    do throws(XenNetError) {
        var token: UInt64 = 0
        while lockstep && monotonicNanoseconds() < end {
            // The order before `exchange` (for --lockstep only): post and kick, reap, copy out.
            let room = depth - device.front.txFramesInFlight
            if room > 0 {
                let posted = try device.submitBatch(UnsafeBufferPointer(rebasing: list[0..<room]), firstToken: token)
                token &+= UInt64(posted)
            }
            device.kick()
            var progressed = try device.reapTx() > 0
            while true {
                let n = try device.pollBatch(into: out, stride: 0, results: results)
                if n == 0 { break }
                for f in results[0..<n] where f.status != .okay || f.length != size { fail("hardened: bad echo \(f)") }
                received += n
                progressed = true
            }
            if !progressed { try device.waitForWork(until: .after(seconds: 5)) }
        }
        while !lockstep && monotonicNanoseconds() < end {
            // One pass in the overlapping order (`exchange`): tx completions reaped, up to
            // `depth` frames posted (each bounced and granted as by `submit`) and the
            // backend kicked, then the echoes copied out (each over the last, as the C loop
            // does) while the backend works on the frames just posted.
            let pass = try device.exchange(
                sending: chunk, firstToken: token, inFlightLimit: depth, into: out, stride: 0,
                results: results)
            token &+= UInt64(pass.sent)
            for f in results[0..<pass.received] where f.status != .okay || f.length != size {
                fail("hardened: bad echo \(f)")
            }
            received += pass.received
            if !pass.progressed { try device.waitForWork(until: .after(seconds: 5)) }
        }
    } catch { fail("hardened: \(error)") }
    let elapsed = Double(monotonicNanoseconds() - start) / 1e9
    cpuHardened += processCPUSeconds() - cpu
    sleepsHardened.frontend += frontendSleeps() - slept
    sleepsHardened.backend += backendSleeps() - backendSlept
    backendNanosHardened += backendRunNanoseconds() - backendRan
    framesHardened += received
    return (Double(received) / elapsed, received)
}

/// The trusting C netfront on the same kind of connection, for `frames` echoes; returns
/// frames per second. Its refs come from the device's issuer (granted, then rewritten by C).
@MainActor func runTrusting(size: Int, frames: Int) -> Double {
    let device = connect()
    defer { device.disconnect() }
    let g = device.front.memory.grants
    let rxSlots = 64
    let rxFrame: UInt32 = 194
    let txFrame: UInt32 = 130
    var rxRefs: [UInt32] = []
    var txRefs: [UInt32] = []
    for i in 0..<rxSlots {
        guard let r = device.front.grants.grant(frame: rxFrame + UInt32(i), readOnly: false) else { fail("refs") }
        rxRefs.append(r)
    }
    for k in 0..<depth {
        guard let r = device.front.grants.grant(frame: txFrame + UInt32(k), readOnly: true) else { fail("refs") }
        txRefs.append(r)
    }
    var env = xen_net_trusting_env(
        tx_sring: g.page(device.front.memory.txRingFrame), rx_sring: g.page(device.front.memory.rxRingFrame),
        gnttab: g.entries, frames: g.frames, evt_to_peer: device.events.outgoing.fileDescriptor,
        evt_from_peer: device.events.incoming.fileDescriptor)
    let out = UnsafeMutablePointer<UInt8>.allocate(capacity: 65536)
    defer { out.deallocate() }
    let cpu = processCPUSeconds()
    let (slept, backendSlept) = (frontendSleeps(), backendSleeps())
    let backendRan = backendRunNanoseconds()
    let start = monotonicNanoseconds()
    let n = xen_net_trusting_run(
        &env, rxRefs, rxFrame, UInt32(rxSlots), txRefs, txFrame, UInt32(depth), UInt32(size), UInt64(frames), out,
        5000, lockstep ? 1 : 0, UInt32(lockstep ? depth : postMax))
    let elapsed = Double(monotonicNanoseconds() - start) / 1e9
    cpuTrusting += processCPUSeconds() - cpu
    sleepsTrusting.frontend += frontendSleeps() - slept
    sleepsTrusting.backend += backendSleeps() - backendSlept
    backendNanosTrusting += backendRunNanoseconds() - backendRan
    framesTrusting += n
    guard n == frames else { fail("trusting C run: \(n) of \(frames) frames") }
    return Double(n) / elapsed
}

print(
    "xen-net-bench: frames of \(sizes.map(String.init).joined(separator: ", ")) bytes echoed by a loopback netback, "
        + "depth \(depth), \(fmt(seconds, 1)) s per run, \(rounds) rounds; backend pid \(child.pid)"
        + (pin ? ", frontend on CPU 0, backend on CPU 1" : ", not pinned")
        + (lockstep ? ", lock-step loops (--lockstep)" : "")
        + (postMax < depth && !lockstep ? ", at most \(postMax) posted a pass" : ""))
if let only {
    for size in sizes {
        for _ in 1...rounds {
            if only == "hardened" {
                let (rate, n) = runHardened(size: size)
                print("\(size) B hardened \(fmt(rate, 0)) frames/s, \(n) frames")
            } else {
                let n = Int(1_000_000 * seconds)
                print("\(size) B trusting \(fmt(runTrusting(size: size, frames: n), 0)) frames/s, \(n) frames")
            }
        }
        let cpu =
            only == "hardened"
            ? cpuHardened / Double(max(1, framesHardened)) : cpuTrusting / Double(max(1, framesTrusting))
        print("\(size) B frontend CPU per frame: \(fmt(cpu * 1e6, 3)) us")
    }
    child.kill()
    exit(0)
}
for size in sizes {
    var ratios: [Double] = []
    (cpuHardened, cpuTrusting, framesHardened, framesTrusting) = (0, 0, 0, 0)
    (sleepsHardened, sleepsTrusting) = ((0, 0), (0, 0))
    (backendNanosHardened, backendNanosTrusting) = (0, 0)
    var hardenedTotal = 0.0
    var trustingTotal = 0.0
    for round in 1...rounds {
        // Alternate which side goes first (ABBA), so drift in machine load cancels out.
        var hardened = 0.0
        var trusting = 0.0
        if round % 2 == 1 {
            let (rate, n) = runHardened(size: size)
            hardened = rate
            trusting = runTrusting(size: size, frames: n)
        } else {
            let probe = Int(max(1000, (round > 1 ? hardenedTotal / Double(round - 1) : 50_000) * seconds))
            trusting = runTrusting(size: size, frames: probe)
            hardened = runHardened(size: size).0
        }
        let ratio = hardened / trusting
        ratios.append(ratio)
        hardenedTotal += hardened
        trustingTotal += trusting
        print(
            "\(size) B round \(round): hardened Swift \(fmt(hardened, 0)) frames/s, trusting C \(fmt(trusting, 0)) "
                + "frames/s, ratio \(fmt(ratio, 3))")
    }
    let usHardened = cpuHardened / Double(max(1, framesHardened)) * 1e6
    let usTrusting = cpuTrusting / Double(max(1, framesTrusting)) * 1e6
    print(
        "\(size) B frontend CPU per frame: hardened \(fmt(usHardened, 3)) us, trusting \(fmt(usTrusting, 3)) us "
            + "(ratio \(fmt(usTrusting / usHardened, 3)))")
    let backendHardened = Double(backendNanosHardened) / Double(max(1, framesHardened)) / 1000
    let backendTrusting = Double(backendNanosTrusting) / Double(max(1, framesTrusting)) / 1000
    print(
        "\(size) B backend CPU per frame (serving thread): hardened \(fmt(backendHardened, 3)) us, trusting "
            + "\(fmt(backendTrusting, 3)) us")
    func per1000(_ n: Int, _ frames: Int) -> String { fmt(Double(n) * 1000 / Double(max(1, frames)), 1) }
    print(
        "\(size) B sleeps per 1000 frames: frontend hardened \(per1000(sleepsHardened.frontend, framesHardened)), "
            + "trusting \(per1000(sleepsTrusting.frontend, framesTrusting)); backend serving hardened "
            + "\(per1000(sleepsHardened.backend, framesHardened)), trusting \(per1000(sleepsTrusting.backend, framesTrusting))"
    )
    let sorted = ratios.sorted()
    print(
        "\(size) B median ratio hardened/trusting: \(fmt(sorted[sorted.count / 2], 3)) (mean frames/s hardened "
            + "\(fmt(hardenedTotal / Double(rounds), 0)), trusting \(fmt(trustingTotal / Double(rounds), 0)))")
}
