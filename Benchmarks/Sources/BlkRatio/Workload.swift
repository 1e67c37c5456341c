#if canImport(Glibc)
import Glibc
#endif
import CBlkPoller
import Histogram
import SharedMemory
import TrustingBlock
import VirtioBlock

/// Which driver a contestant uses.
enum DriverKind: String {
    case hardened, trusting
    /// The hardened driver's async calls from a task group (issue 20), on the pool.
    case async
    /// The same, the tasks preferring the device's executor (its I/O thread).
    case asyncExecutor = "async-executor"
    /// The C busy-polling driver (CBlkPoller), the wait strategies' baseline (issue 19).
    case cpoller
}

/// One side of a comparison: a driver against a back-end socket.
struct Contestant {
    let label: String
    let driver: DriverKind
    let socket: String
    /// The hardened driver's wait strategy (nil: the library's default, `.adaptive`).
    var wait: WaitStrategy? = nil
}

struct Settings {
    var blockSize = 4096
    /// Measured seconds per contestant per point (split over the rounds).
    var runtime = 10.0
    var rounds = 5
    /// Unmeasured seconds at the start of every round (the back-ends' adaptive spin and
    /// the caches settle).
    var warmup = 0.5
    var depths = [1, 32]
    /// Polls before blocking, both drivers (the library's default is 256).
    var spinIterations = VirtioBlockDriver.Options().spinIterations
    /// Run the pool ticker beside synchronous rounds too (async mode).
    var ticker = false
    /// The hardened driver's wait strategy in `run` mode (nil: the library's default).
    var wait: WaitStrategy?
}

/// What one contestant did in one round (or, merged, over all rounds).
struct RunResult {
    var ios = 0
    var seconds = 0.0
    var histogram = Histogram<UInt64>(highestTrackableValue: 120_000_000_000, numberOfSignificantValueDigits: .three)
    var error: String?
    /// Diagnostics over the whole round (warm-up included): requests, kicks, sleeps.
    var requests = 0
    var kicks = 0
    var sleeps = 0
    /// Lateness of a 1 ms `Task.sleep` ticker on the pool during the round (async mode).
    var ticker: Histogram<UInt64>?
    #if RINGFENCE_SPLIT_PROBE
    /// The latency split of the measured window (one round; not merged).
    var split: SplitProbe.Report?
    #endif

    var iops: Double { seconds > 0 ? Double(ios) / seconds : 0 }
    func percentileMicroseconds(_ p: Double) -> Double { Double(histogram.valueAtPercentile(p)) / 1000 }

    mutating func merge(_ other: RunResult) {
        ios += other.ios
        seconds += other.seconds
        histogram.add(other.histogram)
        if error == nil { error = other.error }
        requests += other.requests
        kicks += other.kicks
        sleeps += other.sleeps
        if let t = other.ticker {
            if ticker == nil { ticker = t } else { ticker?.add(t) }
        }
    }
}

/// The two drivers behind one closed-loop workload (specialized once per driver).
protocol LoopDriver {
    /// Posts a read of the slot's buffer at `offset`; an error message on failure.
    func submit(offset: UInt64, slot: Int) -> String?
    /// Waits for the next completion: its slot and whether the device said OK.
    func next() -> (slot: Int, ok: Bool)?
    /// The next completion if one is ready now (never blocks).
    func poll() -> (slot: Int, ok: Bool)?
}

/// The library's hardened driver, used as `ringfence blk bench` uses it: reads land in a
/// private buffer per slot (copied out of the bounce pool after validation).
struct HardenedLoop: LoopDriver {
    let queue: BlockQueue
    let buffers: UnsafeMutableRawBufferPointer
    let blockSize: Int

    func submit(offset: UInt64, slot: Int) -> String? {
        do {
            try queue.submitRead(
                offset: offset,
                into: UnsafeMutableRawBufferPointer(rebasing: buffers[slot * blockSize..<(slot + 1) * blockSize]),
                tag: UInt64(slot))
            return nil
        } catch {
            return "\(error)"
        }
    }

    func next() -> (slot: Int, ok: Bool)? {
        guard let c = queue.wait() else { return nil }
        if case .failure = c.result { return (Int(truncatingIfNeeded: c.tag), false) }
        return (Int(truncatingIfNeeded: c.tag), true)
    }

    func poll() -> (slot: Int, ok: Bool)? {
        guard let c = queue.poll() else { return nil }
        if case .failure = c.result { return (Int(truncatingIfNeeded: c.tag), false) }
        return (Int(truncatingIfNeeded: c.tag), true)
    }
}

/// The baseline: the device writes straight into the shared slot buffer, which the
/// caller reads in place (zero copy).
struct TrustingLoop: LoopDriver {
    let device: TrustingBlockDevice
    let blockSize: Int

    func submit(offset: UInt64, slot: Int) -> String? {
        device.submitRead(offset: offset, length: blockSize, tag: UInt64(slot)) ? nil : "ring full"
    }

    func next() -> (slot: Int, ok: Bool)? {
        guard let c = device.wait() else { return nil }
        return (Int(truncatingIfNeeded: c.tag), c.status == 0)
    }

    func poll() -> (slot: Int, ok: Bool)? {
        guard let c = device.poll() else { return nil }
        return (Int(truncatingIfNeeded: c.tag), c.status == 0)
    }
}

/// fio's randread with a closed loop of `depth`: the same xorshift offsets and the same
/// bookkeeping as `ringfence blk bench`. Completions before `warmup` seconds are not
/// counted; then `seconds` are measured (by completion time), then the loop drains.
///
/// The bookkeeping is the C poller's (`cblk_poll_run`), so the harness costs every
/// contestant the same: the clock is read once per submission and once per batch of
/// completions (one `next()`, then every completion `poll()` has ready at once), and
/// latencies go into a preallocated array that fills the histogram after the round.
func closedLoop<D: LoopDriver>(
    _ driver: D, depth: Int, blockSize: Int, blocks: UInt64, warmup: Double, seconds: Double, seed: UInt64
) -> RunResult {
    var result = RunResult()
    let started = UnsafeMutablePointer<UInt64>.allocate(capacity: depth)
    started.initialize(repeating: 0, count: depth)
    defer { started.deallocate() }
    let capacity = latencyCapacity
    let latencies = UnsafeMutablePointer<UInt32>.allocate(capacity: capacity)
    defer { latencies.deallocate() }
    var recorded = 0
    var rng = seed | 1
    let t0 = monotonicNanoseconds()
    let measureFrom = t0 + UInt64(warmup * 1e9)
    let end = measureFrom + UInt64(seconds * 1e9)
    var outstanding = 0

    func submit(_ slot: Int) -> String? {
        rng ^= rng << 13
        rng ^= rng >> 7
        rng ^= rng << 17
        started[slot] = monotonicNanoseconds()
        return driver.submit(offset: (rng % blocks) * UInt64(blockSize), slot: slot)
    }

    for slot in 0..<depth {
        if let e = submit(slot) {
            result.error = e
            break
        }
        outstanding += 1
    }
    var last = t0
    var completed = 0
    #if RINGFENCE_SPLIT_PROBE
    var probe = 0  // 0 before the window, 1 in it, 2 after
    #endif
    while outstanding > 0, var c = driver.next() {
        var now = monotonicNanoseconds()
        last = now
        #if RINGFENCE_SPLIT_PROBE
        if probe == 0 && now >= measureFrom && now < end {
            SplitProbe.arm()
            probe = 1
        } else if probe == 1 && now >= end {
            SplitProbe.disarm()
            probe = 2
        }
        #endif
        while true {
            // A `poll` past the batch may return a request submitted after `now` was read.
            if started[c.slot] > now {
                now = monotonicNanoseconds()
                last = now
            }
            outstanding -= 1
            completed += 1
            if !c.ok {
                if result.error == nil { result.error = "device returned an error status" }
            } else {
                if now >= measureFrom && now < end {
                    if recorded < capacity {
                        latencies[recorded] = UInt32(
                            truncatingIfNeeded: min(now &- started[c.slot], UInt64(UInt32.max)))
                        recorded += 1
                    }
                    result.ios += 1
                }
                if now < end && result.error == nil {
                    if let e = submit(c.slot) {
                        result.error = e
                    } else {
                        outstanding += 1
                    }
                }
            }
            guard outstanding > 0, let more = driver.poll() else { break }
            c = more
        }
    }
    for i in 0..<recorded { _ = result.histogram.record(UInt64(latencies[i])) }
    #if RINGFENCE_SPLIT_PROBE
    if probe == 1 { SplitProbe.disarm() }
    if probe > 0 { result.split = SplitProbe.report() }
    #endif
    if outstanding > 0 && result.error == nil { result.error = "lost \(outstanding) requests" }
    result.requests = completed
    let measuredEnd = min(last, end)
    result.seconds = measuredEnd > measureFrom ? Double(measuredEnd - measureFrom) / 1e9 : 0
    return result
}

/// Latencies one round keeps (the C poller's capacity too); later ones count, unrecorded.
let latencyCapacity = 8 << 20

/// Connects the contestant's driver, runs one round, disconnects.
func runRound(_ c: Contestant, depth: Int, settings: Settings, seconds: Double, seed: UInt64) -> RunResult {
    let queueSize = min(1024, max(128, 1 << (Int.bitWidth - (depth * 3 - 1).leadingZeroBitCount)))
    switch c.driver {
    case .hardened, .async, .asyncExecutor:
        var options = VirtioBlockDriver.Options()
        options.queueSize = queueSize
        options.spinIterations = settings.spinIterations
        if let wait = c.wait { options.wait = wait }
        let disk: VirtioBlockDriver
        do {
            disk = try VirtioBlockDriver.connect(socket: c.socket, options: options)
        } catch {
            return RunResult(error: "connect \(c.socket): \(error)")
        }
        defer { disk.close() }
        let blocks = disk.info.capacityBytes / UInt64(settings.blockSize)
        guard blocks > 0 else { return RunResult(error: "disk smaller than one block") }
        let buffers = UnsafeMutableRawBufferPointer.allocate(byteCount: settings.blockSize * depth, alignment: 4096)
        defer { buffers.deallocate() }
        buffers.initializeMemory(as: UInt8.self, repeating: 0x5a)
        if c.driver == .async || c.driver == .asyncExecutor {
            var r = asyncRound(
                disk: disk, depth: depth, settings: settings, seconds: seconds, seed: seed,
                onDeviceExecutor: c.driver == .asyncExecutor)
            let s = disk.queue(0).statistics  // the engine is idle once every read returned
            r.kicks = Int(s.kicks)
            r.sleeps = Int(s.spuriousNotifications)
            return r
        }
        let loop = {
            closedLoop(
                HardenedLoop(queue: disk.queue(0), buffers: buffers, blockSize: settings.blockSize), depth: depth,
                blockSize: settings.blockSize, blocks: blocks, warmup: settings.warmup, seconds: seconds, seed: seed)
        }
        var r = settings.ticker ? syncRoundWithTicker(loop, warmup: settings.warmup, seconds: seconds) : loop()
        let s = disk.queue(0).statistics
        r.requests = Int(s.completed)
        r.kicks = Int(s.kicks)
        return r
    case .cpoller:
        #if RINGFENCE_SPLIT_PROBE
        if getenv("BLK_RATIO_NOTIFIER") != nil { _ = try? Notifier() }
        #endif
        return cPollerRound(socket: c.socket, depth: depth, settings: settings, seconds: seconds, seed: seed)
    case .trusting:
        let device: TrustingBlockDevice
        do {
            device = try TrustingBlockDevice.connect(
                socket: c.socket, queueSize: queueSize, requestBytes: settings.blockSize,
                spinIterations: settings.spinIterations)
        } catch {
            return RunResult(error: "connect \(c.socket): \(error)")
        }
        defer { device.close() }
        let blocks = device.capacityBytes / UInt64(settings.blockSize)
        guard blocks > 0 else { return RunResult(error: "disk smaller than one block") }
        var r = closedLoop(
            TrustingLoop(device: device, blockSize: settings.blockSize), depth: depth, blockSize: settings.blockSize,
            blocks: blocks, warmup: settings.warmup, seconds: seconds, seed: seed)
        r.kicks = device.counters.kicks
        r.sleeps = device.counters.sleeps
        return r
    }
}

/// One round of the C busy-polling driver; its latencies go into the same histogram.
func cPollerRound(socket: String, depth: Int, settings: Settings, seconds: Double, seed: UInt64) -> RunResult {
    let capacity = latencyCapacity
    let latencies = UnsafeMutablePointer<UInt32>.allocate(capacity: capacity)
    defer { latencies.deallocate() }
    var out = cblk_result()
    let rc = cblk_poll_run(
        socket, Int32(depth), Int32(settings.blockSize), settings.warmup, seconds, seed, latencies, capacity, &out)
    var r = RunResult()
    if rc != 0 || out.error != 0 {
        let message = withUnsafeBytes(of: out.message) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        r.error = "C poller: \(message)"
    }
    r.ios = Int(out.ios)
    r.seconds = out.seconds
    for i in 0..<Int(out.recorded) { _ = r.histogram.record(UInt64(latencies[i])) }
    r.requests = Int(out.completed)
    r.kicks = Int(out.kicks)
    #if RINGFENCE_SPLIT_PROBE
    r.split = withUnsafePointer(to: &out.split) { SplitProbe.report(of: $0) }
    #endif
    return r
}

#if RINGFENCE_SPLIT_PROBE
/// "turnaround mean/p50/p90/p99 ns, write ..., device ...": one line per round.
func describe(_ r: SplitProbe.Report) -> String {
    func ns(_ ticks: Double) -> Int { Int((ticks / r.ticksPerNanosecond).rounded()) }
    func one(_ name: String, _ p: SplitProbe.Part) -> String {
        guard p.count > 0 else { return "\(name) n/a" }
        func percentile(_ q: Double) -> Int {
            let target = UInt64((Double(p.count) * q).rounded(.up))
            var seen: UInt64 = 0
            for (i, n) in p.histogram.enumerated() {
                seen += UInt64(n)
                if seen >= target { return ns(Double((i + 1) * r.bucketTicks)) }
            }
            return -1
        }
        return "\(name) mean \(ns(Double(p.sumTicks) / Double(p.count))) p50 \(percentile(0.5)) "
            + "p90 \(percentile(0.9)) p99 \(percentile(0.99))"
    }
    return "split ns: " + one("turnaround", r.turnaround) + "; " + one("write", r.write) + "; "
        + one("device", r.device) + " (n \(r.device.count))"
}
#endif

/// Two contestants at one depth, interleaved: `rounds` rounds, each running A and B for
/// runtime/rounds seconds, alternating which goes first (ABBA), so load drift hits both.
struct PairResult {
    var a = RunResult()
    var b = RunResult()
    /// Per round: A's IOPS / B's IOPS.
    var roundRatios: [Double] = []
    var ratio: Double { b.iops > 0 ? a.iops / b.iops : .nan }
}

func comparePair(_ a: Contestant, _ b: Contestant, depth: Int, settings: Settings, log: (String) -> Void) -> PairResult
{
    var pair = PairResult()
    let seconds = settings.runtime / Double(settings.rounds)
    for round in 0..<settings.rounds {
        let seed = 0x2545_f491_4f6c_dd1d &+ UInt64(round)
        let order = round % 2 == 0 ? [a, b] : [b, a]
        var results: [String: RunResult] = [:]
        for c in order {
            let r = runRound(c, depth: depth, settings: settings, seconds: seconds, seed: seed)
            log(
                "  round \(round + 1)/\(settings.rounds) \(c.label) depth \(depth): "
                    + "\(Int(r.iops)) IOPS, p50 \(r.percentileMicroseconds(50)) us, p99 \(r.percentileMicroseconds(99)) us"
                    + ", \(r.requests) requests, \(r.kicks) kicks, \(r.sleeps) sleeps or spurious wake-ups"
                    + (r.error.map { " ERROR \($0)" } ?? ""))
            results[c.label] = r
        }
        let ra = results[a.label] ?? RunResult()
        let rb = results[b.label] ?? RunResult()
        pair.a.merge(ra)
        pair.b.merge(rb)
        if rb.iops > 0 { pair.roundRatios.append(ra.iops / rb.iops) }
    }
    return pair
}

/// Several contestants at one depth, interleaved: every round runs each for
/// runtime/rounds seconds, the order rotated by one per round, so load drift hits all.
struct GroupResult {
    /// Per contestant: every round merged.
    var merged: [RunResult]
    /// Per round, per contestant: IOPS.
    var roundIOPS: [[Double]] = []

    /// Per round: contestant `i`'s IOPS / contestant `base`'s.
    func roundRatios(_ i: Int, to base: Int) -> [Double] {
        roundIOPS.compactMap { $0[base] > 0 ? $0[i] / $0[base] : nil }
    }
}

func compareGroup(_ contestants: [Contestant], depth: Int, settings: Settings, log: (String) -> Void) -> GroupResult {
    var group = GroupResult(merged: Array(repeating: RunResult(), count: contestants.count))
    let seconds = settings.runtime / Double(settings.rounds)
    for round in 0..<settings.rounds {
        let seed = 0x2545_f491_4f6c_dd1d &+ UInt64(round)
        var iops = [Double](repeating: 0, count: contestants.count)
        for k in 0..<contestants.count {
            let i = (k + round) % contestants.count
            let c = contestants[i]
            let r = runRound(c, depth: depth, settings: settings, seconds: seconds, seed: seed)
            log(
                "  round \(round + 1)/\(settings.rounds) \(c.label) depth \(depth): "
                    + "\(Int(r.iops)) IOPS, p50 \(r.percentileMicroseconds(50)) us, p99 \(r.percentileMicroseconds(99)) us"
                    + ", \(r.requests) requests, \(r.kicks) kicks" + (r.error.map { " ERROR \($0)" } ?? ""))
            #if RINGFENCE_SPLIT_PROBE
            if let split = r.split { log("    \(c.label) \(describe(split))") }
            #endif
            group.merged[i].merge(r)
            iops[i] = r.iops
        }
        group.roundIOPS.append(iops)
    }
    return group
}

/// Reads `count` random blocks with both drivers, one at a time, and compares the bytes:
/// proves the baseline really moves the data it is timed on. nil when all matched.
func crossCheck(socket: String, blockSize: Int, count: Int) -> String? {
    let disk: VirtioBlockDriver
    let trusting: TrustingBlockDevice
    do {
        disk = try VirtioBlockDriver.connect(socket: socket)
    } catch {
        return "connect (hardened): \(error)"
    }
    defer { disk.close() }
    let blocks = disk.info.capacityBytes / UInt64(blockSize)
    var offsets: [UInt64] = []
    var rng: UInt64 = 0x9e37_79b9_7f4a_7c15
    for _ in 0..<count {
        rng ^= rng << 13
        rng ^= rng >> 7
        rng ^= rng << 17
        offsets.append((rng % max(blocks, 1)) * UInt64(blockSize))
    }
    var expected: [[UInt8]] = []
    for o in offsets {
        do {
            expected.append(try disk.read(at: o, count: blockSize))
        } catch {
            return "hardened read at \(o): \(error)"
        }
    }
    disk.close()
    do {
        trusting = try TrustingBlockDevice.connect(socket: socket, queueSize: 128, requestBytes: blockSize)
    } catch {
        return "connect (trusting): \(error)"
    }
    defer { trusting.close() }
    guard trusting.capacityBytes == disk.info.capacityBytes else { return "capacities differ" }
    for (i, o) in offsets.enumerated() {
        guard trusting.submitRead(offset: o, length: blockSize, tag: UInt64(i)), let c = trusting.wait() else {
            return "trusting read at \(o) failed"
        }
        guard c.status == 0, c.tag == UInt64(i) else { return "trusting read at \(o): status \(c.status)" }
        let same = expected[i].withUnsafeBytes { e in e.baseAddress.map { memcmp($0, c.data, blockSize) == 0 } ?? false
        }
        guard same else { return "block at \(o) differs between the drivers" }
    }
    return nil
}

/// Nanoseconds one empty `poll()` costs each driver (nothing in flight): how long the
/// 256-poll spin of `wait()` lasts before the driver blocks.
func pollCost(socket: String, polls: Int) -> (hardened: Double, trusting: Double)? {
    guard let disk = try? VirtioBlockDriver.connect(socket: socket) else { return nil }
    let q = disk.queue(0)
    var t0 = monotonicNanoseconds()
    var got = 0
    for _ in 0..<polls where q.poll() != nil { got += 1 }
    let hardened = Double(monotonicNanoseconds() - t0) / Double(polls)
    disk.close()
    guard let trusting = try? TrustingBlockDevice.connect(socket: socket) else { return nil }
    t0 = monotonicNanoseconds()
    for _ in 0..<polls where trusting.poll() != nil { got += 1 }
    let t = Double(monotonicNanoseconds() - t0) / Double(polls)
    trusting.close()
    return got == 0 ? (hardened, t) : nil
}
