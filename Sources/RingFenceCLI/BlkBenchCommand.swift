import ArgumentParser
import BlockBench
import Dispatch
import Foundation
import Histogram
import SharedMemory
import Synchronization
import VirtioBlock

enum BenchMode: String, ExpressibleByArgument, CaseIterable {
    case read, write, randread, randwrite, randrw
    var pattern: BlockBenchPattern { BlockBenchPattern(rawValue: rawValue) ?? .randread }
}

/// Shared between the per-queue worker threads and the progress line.
final class BenchState: Sendable {
    let progress = BlockBenchProgress()
    let results = Mutex<[(Histogram<UInt64>, Int, VirtioError?)]>([])
}

struct BlkBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "fio-like benchmark: IOPS, MiB/s, latency percentiles.",
        discussion: helpDiscussion(
            "Like fio: --rw, --bs, --iodepth, --runtime; a progress line each second on a terminal; --json with fio's names.",
            examples: "ringfence blk --socket blk.sock bench --rw randread --bs 4k --iodepth 32",
            "ringfence blk --socket blk.sock --poll bench --iodepth 1 --runtime 5",
            "ringfence blk --socket blk.sock bench --rw write --bs 1M --json"))
    @ParentCommand var blk: Blk
    @Option(help: "Pattern.") var rw: BenchMode = .randread
    @Option(help: "Block size in bytes (512, 4k, 1M...).") var bs: Size = Size(4096)
    @Option(help: "Requests in flight per queue.") var iodepth: Int = 1
    @Option(help: "Seconds to run.") var runtime: Double = 10
    @Option(help: "Bytes of the disk to cover (default: all of it).") var size: Size?
    @Flag(help: "Print the result as JSON (fio's names: iops, bw in KiB/s, lat_ns percentiles).") var json = false

    func validate() throws {
        guard iodepth >= 1, iodepth <= 1024 else { throw ValidationError("--iodepth must be 1...1024") }
        guard runtime > 0, runtime <= 3600 else { throw ValidationError("--runtime must be in (0, 3600]") }
        guard bs.bytes >= 512 else { throw ValidationError("--bs must be at least 512") }
    }

    func run() throws {
        if blk.verified.enabled {
            guard rw == .randread || rw == .randwrite, bs.bytes == 4096 else {
                throw ValidationError("verified bench runs --rw randread or randwrite with --bs 4k")
            }
            return try blk.withVerified {
                try $0.bench(write: rw == .randwrite, depth: min(iodepth, 64), seconds: runtime)
            }
        }
        let queueSize = max(128, 1 << (Int.bitWidth - (iodepth * 3 - 1).leadingZeroBitCount))
        let disk = try blk.open(queueSize: min(queueSize, 1024))
        defer { disk.close() }
        let info = disk.info
        guard bs.bytes % info.blockSize == 0, bs.bytes <= info.maxTransfer else {
            throw ValidationError("--bs must be a multiple of \(info.blockSize) and at most \(info.maxTransfer)")
        }
        if rw != .read && rw != .randread && info.readOnly {
            _ = try runOrExit { () throws(VirtioError) -> Int in throw .readOnly }
        }
        let span = UInt64(min(size?.bytes ?? Int(clamping: info.capacityBytes), Int(clamping: info.capacityBytes)))
        let blocks = span / UInt64(bs.bytes)
        guard blocks >= 1 else { throw ValidationError("the disk is smaller than --bs") }
        let state = BenchState()
        let group = DispatchGroup()
        let start = monotonicNanoseconds()
        let bsBytes = bs.bytes
        for qi in 0..<disk.queueCount {
            // Each queue runs the library's loop; sequential runs start queues apart.
            var bench = BlockBench(
                pattern: rw.pattern, blockSize: bsBytes, depth: iodepth, seconds: runtime, blocks: blocks)
            bench.firstBlock = UInt64(qi) &* (blocks / UInt64(max(1, disk.queueCount)))
            bench.seed &+= UInt64(qi)
            bench.recordsLatency = true
            let queueBench = bench
            DispatchQueue.global().async(group: group) {
                let r = queueBench.run(disk.queue(qi), progress: state.progress)
                let histogram =
                    r.latencies
                    ?? Histogram(highestTrackableValue: 120_000_000_000, numberOfSignificantValueDigits: .three)
                state.results.withLock { $0.append((histogram, r.requests, r.firstError)) }
            }
        }
        let line = ProgressLine(json: json)
        while group.wait(timeout: .now() + 1) == .timedOut {
            let elapsed = Double(monotonicNanoseconds() - start) / 1e9
            line.show(
                ProgressLine.blockLine(elapsed: elapsed, runtime: runtime, ios: state.progress.completed, bs: bsBytes))
        }
        line.clear()
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        var histogram = Histogram<UInt64>(
            highestTrackableValue: 120_000_000_000, numberOfSignificantValueDigits: .three)
        var total = 0
        var firstError: VirtioError?
        for (h, n, e) in state.results.withLock({ $0 }) {
            histogram.add(h)
            total += n
            if firstError == nil { firstError = e }
        }
        let result = BlockBenchResult(
            rw: rw.rawValue, bs: bs.bytes, iodepth: iodepth, queues: disk.queueCount, seconds: elapsed, ios: total,
            latencies: histogram, error: firstError.map { "\($0)" })
        if json { print(result.json) } else { printBench(result) }
        if let firstError {
            FileHandle.standardError.write(Data("ringfence blk: error: \(firstError)\n".utf8))
            throw ExitCode(1)
        }
    }
}
