// Split-ring round trips: hardened DriverQueue vs the trusting baseline (TrustingRing),
// both against the library's hardened DeviceQueue. Queue 256, batches of 32, 64-byte
// buffers, busy-poll. Each benchmark iteration is 1000 round trips (scalingFactor
// .kilo), so wall clock reads as time per round trip and throughput as round trips/s.
//
// For the hardened/trusting ratio, use `ring-ratio` (interleaved rounds in one process);
// these benchmarks give each figure on its own, with percentiles and malloc counts.
import Benchmark
import RingWorkload

/// The runner a benchmark's setup made, for its closure and teardown.
final class RunnerBox: @unchecked Sendable {
    var runner: (any RingRunner)?
}

let benchmarks: @Sendable () -> Void = {
    let twoCPUs = availableCPUs >= 2
    for scenario in Scenario.allCases {
        for kind in DriverKind.allCases {
            let box = RunnerBox()
            let parameters: RingParameters = {
                var p = RingParameters()
                if scenario == .ringtest { p.batch = 1 }  // ringtest's default --batch 1
                return p
            }()
            Benchmark(
                "\(scenario.rawValue) \(kind.rawValue)",
                configuration: .init(
                    metrics: [.wallClock, .throughput, .mallocCountTotal],
                    warmupIterations: 20,
                    scalingFactor: .kilo,
                    maxDuration: .seconds(2),
                    maxIterations: 5_000,
                    // Two busy-polling threads need two CPUs.
                    skip: scenario.needsDeviceThread && !twoCPUs
                ),
                closure: { benchmark in
                    guard let runner = box.runner else { return }
                    pinCurrentThread(to: parameters.driverCPU)
                    benchmark.startMeasurement()
                    runner.perform(scenario, operations: benchmark.scaledIterations.count)
                    benchmark.stopMeasurement()
                },
                setup: {
                    let runner = try makeRunner(kind, parameters: parameters)
                    if scenario.needsDeviceThread { runner.startDeviceThread() }
                    box.runner = runner
                },
                teardown: {
                    box.runner?.stopDeviceThread()
                    box.runner = nil
                }
            )
        }
    }
}
