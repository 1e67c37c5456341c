public import Histogram
import SharedMemory
import Synchronization

/// Which blocks a benchmark touches, and in which direction.
public enum BlockBenchPattern: String, Sendable, CaseIterable {
    case read, write, randread, randwrite, randrw
    public var isRandom: Bool { self == .randread || self == .randwrite || self == .randrw }
}

/// Requests completed so far, for a progress line read from another thread.
public final class BlockBenchProgress: Sendable {
    let counter = Atomic<Int>(0)
    public init() {}
    public var completed: Int { counter.load(ordering: .relaxed) }
}

/// Figures from one benchmark loop.
public struct BlockBenchReport<Failure: Error> {
    /// Requests completed successfully.
    public var requests = 0
    public var bytes = 0
    public var seconds = 0.0
    /// Requests that completed with a failure.
    public var errors = 0
    /// The first failure (completion, submit or wait); the loop stops submitting after it.
    public var firstError: Failure?
    /// Submit-to-completion latency in nanoseconds (when `BlockBench.recordsLatency`).
    public var latencies: Histogram<UInt64>?
    public var requestsPerSecond: Double { seconds > 0 ? Double(requests) / seconds : 0 }
    public var mebibytesPerSecond: Double { seconds > 0 ? Double(bytes) / seconds / 1_048_576 : 0 }

    public init() {}
}

/// The closed benchmark loop both block transports run (`ringfence blk bench`,
/// `ringfence xen-blk bench`, `xen-bench`): `depth` requests of `blockSize` bytes kept
/// in flight on one `BlockBenchQueue` for `seconds`, each buffer posted again as soon as
/// its request completes, through the same hardened path as any other request.
/// It lives in its own module so the transports carry no benchmark code.
public struct BlockBench: Sendable {
    public var pattern: BlockBenchPattern
    public var blockSize: Int
    public var depth: Int
    public var seconds: Double
    /// Blocks of `blockSize` the run cycles over (at least 1).
    public var blocks: UInt64
    /// Where a sequential run starts (queues of one device start apart).
    public var firstBlock: UInt64 = 0
    /// Seeds the random pattern (xorshift).
    public var seed: UInt64 = 0x2545_f491_4f6c_dd1d
    /// Reads the clock around every request for a latency histogram. Off, the clock is
    /// read only every eighth batch: per request it would cost more than the checks a
    /// hardened ring makes.
    public var recordsLatency = false

    public init(pattern: BlockBenchPattern, blockSize: Int, depth: Int, seconds: Double, blocks: UInt64) {
        self.pattern = pattern
        self.blockSize = max(1, blockSize)
        self.depth = max(1, depth)
        self.seconds = seconds
        self.blocks = max(1, blocks)
    }

    /// Runs the loop on `queue`; counts each completion into `progress` when given. The
    /// transports of this package have concrete overloads (specialized here, so callers in
    /// other modules do not run the generic loop through witness tables).
    public func run<Queue: BlockBenchQueue>(_ queue: Queue, progress: BlockBenchProgress? = nil)
        -> BlockBenchReport<Queue.Failure>
    {
        runLoop(queue, progress: progress)
    }

    func runLoop<Queue: BlockBenchQueue>(_ queue: Queue, progress: BlockBenchProgress?)
        -> BlockBenchReport<Queue.Failure>
    {
        var loop = Loop(bench: self, progress: progress)
        defer { loop.deallocate() }
        return loop.run(queue)
    }

    /// The loop's private state: buffers, per-slot start times, the block cursor.
    struct Loop {
        let bench: BlockBench
        let progress: BlockBenchProgress?
        let buffers: UnsafeMutableRawBufferPointer
        /// `buffers.baseAddress`: buffer `slot` starts at `base + slot * blockSize`.
        let base: UnsafeMutableRawPointer
        let started: UnsafeMutableBufferPointer<UInt64>
        /// The pattern, decided once: random blocks, all writes, or a random mix.
        let random: Bool
        let writes: Bool
        let mixed: Bool
        var rng: UInt64
        var sequential: UInt64
        var end: UInt64 = 0
        var stopping = false

        init(bench: BlockBench, progress: BlockBenchProgress?) {
            self.bench = bench
            self.progress = progress
            base = UnsafeMutableRawPointer.allocate(byteCount: bench.depth * bench.blockSize, alignment: 4096)
            buffers = UnsafeMutableRawBufferPointer(start: base, count: bench.depth * bench.blockSize)
            for i in 0..<buffers.count { buffers[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
            random = bench.pattern.isRandom
            writes = bench.pattern == .write || bench.pattern == .randwrite
            mixed = bench.pattern == .randrw
            started = UnsafeMutableBufferPointer.allocate(capacity: bench.depth)
            started.initialize(repeating: 0)
            rng = bench.seed
            sequential = bench.firstBlock
        }

        func deallocate() {
            base.deallocate()
            started.deallocate()
        }

        mutating func run<Queue: BlockBenchQueue>(_ queue: Queue) -> BlockBenchReport<Queue.Failure> {
            var report = BlockBenchReport<Queue.Failure>()
            if bench.recordsLatency {
                report.latencies = Histogram(
                    highestTrackableValue: 120_000_000_000, numberOfSignificantValueDigits: .three)
            }
            let start = monotonicNanoseconds()
            end = start &+ UInt64(max(0, min(bench.seconds, 1e6)) * 1e9)
            var inFlight = 0
            var batches = 0
            do throws(Queue.Failure) {
                for slot in 0..<bench.depth {
                    try submit(slot, on: queue, report: &report)
                    inFlight &+= 1
                }
                queue.kick()
                while inFlight > 0 {
                    var progressed = false
                    while let c = try queue.nextCompletion() {
                        progressed = true
                        inFlight &-= 1
                        if try complete(c, on: queue, report: &report) { inFlight &+= 1 }
                    }
                    if progressed {
                        queue.kick()
                        batches &+= 1
                        if !stopping && batches & 7 == 0 && monotonicNanoseconds() >= end { stopping = true }
                        continue
                    }
                    guard let c = try queue.waitForNextCompletion() else { break }
                    inFlight &-= 1
                    if !stopping && monotonicNanoseconds() >= end { stopping = true }
                    if try complete(c, on: queue, report: &report) { inFlight &+= 1 }
                    queue.kick()
                }
            } catch {
                // A submit refused (the device is broken or full) or the transport failed:
                // what is still in flight is drained, nothing new is posted.
                if report.firstError == nil { report.firstError = error }
                stopping = true
                while inFlight > 0, let c = try? queue.waitForNextCompletion() {
                    inFlight &-= 1
                    _ = try? complete(c, on: queue, report: &report)
                }
            }
            report.bytes = report.requests &* bench.blockSize
            report.seconds = Double(monotonicNanoseconds() &- start) / 1e9
            return report
        }

        /// Accounts one completion; posts its buffer again unless the run is ending.
        /// True if it was posted again.
        @inline(__always)
        mutating func complete<Queue: BlockBenchQueue>(
            _ c: BlockBenchCompletion<Queue.Failure>, on queue: Queue, report: inout BlockBenchReport<Queue.Failure>
        ) throws(Queue.Failure) -> Bool {
            if let failure = c.failure {
                report.errors &+= 1
                if report.firstError == nil { report.firstError = failure }
                stopping = true
                return false
            }
            report.requests &+= 1
            progress?.counter.wrappingAdd(1, ordering: .relaxed)
            if bench.recordsLatency {
                let now = monotonicNanoseconds()
                _ = report.latencies?.record(now &- started[c.slot])
                if now >= end { stopping = true }
            }
            guard !stopping else { return false }
            try submit(c.slot, on: queue, report: &report)
            return true
        }

        /// Posts buffer `slot` for the next block of the pattern.
        @inline(__always)
        mutating func submit<Queue: BlockBenchQueue>(
            _ slot: Int, on queue: Queue, report: inout BlockBenchReport<Queue.Failure>
        ) throws(Queue.Failure) {
            let block: UInt64
            if random {
                rng ^= rng << 13
                rng ^= rng >> 7
                rng ^= rng << 17
                block = rng % bench.blocks
            } else {
                block = sequential % bench.blocks
                sequential &+= 1
            }
            let write = writes || (mixed && rng & (1 << 40) != 0)
            let buffer = UnsafeMutableRawBufferPointer(start: base + slot &* bench.blockSize, count: bench.blockSize)
            if bench.recordsLatency { started[slot] = monotonicNanoseconds() }
            try queue.submit(slot: slot, buffer: buffer, offset: block &* UInt64(bench.blockSize), write: write)
        }
    }
}
