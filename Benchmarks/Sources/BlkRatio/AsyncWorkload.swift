import Foundation
import Histogram
import SharedMemory
import VirtioBlock

// Issue 20: the async calls (`await disk.read`) at iodepth N from a task group against the
// synchronous queue API on the same back-end, with a 1 ms `Task.sleep` ticker on the pool
// measuring how late it wakes (the pool must never be starved).

/// Lateness of a `Task.sleep(for: .milliseconds(1))` loop running on the cooperative pool
/// from `from` to `until` (monotonic nanoseconds): how much later than 1 ms each wake-up came.
func tickerLateness(from: UInt64, until: UInt64) async -> Histogram<UInt64> {
    var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    while monotonicNanoseconds() < from { try? await Task.sleep(for: .milliseconds(1)) }
    while monotonicNanoseconds() < until {
        let t = monotonicNanoseconds()
        try? await Task.sleep(for: .milliseconds(1))
        let slept = monotonicNanoseconds() - t
        _ = h.record(slept > 1_000_000 ? slept - 1_000_000 : 0)
    }
    return h
}

/// A value handed from a task to the waiting thread (the semaphore orders the accesses).
final class ResultBox<T>: @unchecked Sendable { var value: T? }

/// Runs `body` on the cooperative pool and waits for it on this (non-pool) thread.
func blockOn<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let box = ResultBox<T>()
    let done = DispatchSemaphore(value: 0)
    Task {
        box.value = await body()
        done.signal()
    }
    done.wait()
    return box.value!
}

/// `depth` child tasks, each an `await disk.read` loop over the same xorshift offsets as
/// `closedLoop`, and the ticker beside them. `onDeviceExecutor`: the tasks and the ticker
/// prefer the device's executor (they run on its I/O thread; the ticker then measures how
/// promptly that thread runs a job queued from elsewhere, the sleep's timer).
func asyncRound(
    disk: VirtioBlockDriver, depth: Int, settings: Settings, seconds: Double, seed: UInt64, onDeviceExecutor: Bool
) -> RunResult {
    let executor: DeviceExecutor?
    do {
        executor = onDeviceExecutor ? try disk.executor() : nil
    } catch {
        return RunResult(error: "executor: \(error)")
    }
    return blockOn {
        await withTaskExecutorPreference(executor) {
            await asyncTasks(disk: disk, depth: depth, settings: settings, seconds: seconds, seed: seed)
        }
    }
}

func asyncTasks(disk: VirtioBlockDriver, depth: Int, settings: Settings, seconds: Double, seed: UInt64) async
    -> RunResult
{
    let blockSize = settings.blockSize
    let blocks = disk.info.capacityBytes / UInt64(blockSize)
    guard blocks > 0 else { return RunResult(error: "disk smaller than one block") }
    let t0 = monotonicNanoseconds()
    let measureFrom = t0 + UInt64(settings.warmup * 1e9)
    let end = measureFrom + UInt64(seconds * 1e9)
    do {
        async let ticker = tickerLateness(from: measureFrom, until: end)
        var result = await withTaskGroup(of: RunResult.self) { group in
            for slot in 0..<depth {
                group.addTask {
                    var r = RunResult()
                    var rng = (seed &+ UInt64(slot) &* 0x9e37_79b9_7f4a_7c15) | 1
                    while true {
                        rng ^= rng << 13
                        rng ^= rng >> 7
                        rng ^= rng << 17
                        let started = monotonicNanoseconds()
                        if started >= end { break }
                        do {
                            _ = try await disk.read(at: (rng % blocks) * UInt64(blockSize), count: blockSize)
                        } catch {
                            r.error = "\(error)"
                            break
                        }
                        let now = monotonicNanoseconds()
                        r.requests += 1
                        if now >= measureFrom && now < end {
                            _ = r.histogram.record(now - started)
                            r.ios += 1
                        }
                    }
                    return r
                }
            }
            var total = RunResult()
            for await r in group { total.merge(r) }
            return total
        }
        result.seconds = Double(end - measureFrom) / 1e9
        result.ticker = await ticker
        return result
    }
}

/// The synchronous queue API's round with the same ticker on the pool beside it.
func syncRoundWithTicker(_ run: () -> RunResult, warmup: Double, seconds: Double) -> RunResult {
    let t0 = monotonicNanoseconds()
    let from = t0 + UInt64(warmup * 1e9)
    let until = from + UInt64(seconds * 1e9)
    let box = ResultBox<Histogram<UInt64>>()
    let done = DispatchSemaphore(value: 0)
    Task {
        box.value = await tickerLateness(from: from, until: until)
        done.signal()
    }
    var r = run()
    done.wait()
    r.ticker = box.value
    return r
}
