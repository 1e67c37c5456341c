// ring-ratio: hardened DriverQueue vs the trusting baseline, interleaved in one process.
//
// Each round runs every scenario once per driver, alternating which driver goes first
// (ABBA), so drift in machine load hits both alike. Reported: the median over rounds of
// each driver's time per round trip, and the median of the per-round ratios
// hardened speed / trusting speed (1.00 = free hardening; DESIGN.md §5 asks >= 0.97).
import Foundation
import RingWorkload

struct Options {
    var rounds = 9
    var batchOperations = 1 << 18
    var latencyOperations = 1 << 16
    var scenarios = Scenario.allCases
}

func usage(_ code: Int32 = 2) -> Never {
    print("""
        usage: ring-ratio [--rounds N] [--batch-ops N] [--latency-ops N] [--quick]
                          [--scenario 1b|2b|1l|2l]...
          --rounds N       interleaved rounds per scenario (default 9; median reported)
          --batch-ops N    round trips per round in the batch scenarios (default 262144)
          --latency-ops N  round trips per round in the latency scenarios (default 65536)
          --quick          3 rounds, 1/8 of the operations (for development)
        """)
    exit(code)
}

func parse() -> Options {
    var o = Options()
    var picked: [Scenario] = []
    var args = CommandLine.arguments.dropFirst()
    func int(_ name: String) -> Int {
        guard let v = args.popFirst(), let n = Int(v), n > 0 else { usage() }
        return n
    }
    while let a = args.popFirst() {
        switch a {
        case "--rounds": o.rounds = int(a)
        case "--batch-ops": o.batchOperations = int(a)
        case "--latency-ops": o.latencyOperations = int(a)
        case "--quick":
            o.rounds = 3
            o.batchOperations /= 8
            o.latencyOperations /= 8
        case "--scenario":
            switch args.popFirst() {
            case "1b": picked.append(.oneThreadBatch)
            case "2b": picked.append(.twoThreadBatch)
            case "1l": picked.append(.oneThreadLatency)
            case "2l": picked.append(.twoThreadLatency)
            default: usage()
            }
        case "--help", "-h": usage(0)
        default: usage()
        }
    }
    if !picked.isEmpty { o.scenarios = picked }
    return o
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return .nan }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

func cpuModel() -> String {
    guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return "?" }
    for line in text.split(separator: "\n") where line.hasPrefix("model name") {
        return line.split(separator: ":", maxSplits: 1).last.map { $0.trimmingCharacters(in: .whitespaces) } ?? "?"
    }
    return "?"
}

func loadAverage() -> String {
    guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8) else { return "?" }
    return text.split(separator: " ").prefix(3).joined(separator: " ")
}

func f(_ x: Double, _ digits: Int = 1) -> String { String(format: "%.\(digits)f", x) }
func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }

let options = parse()
let parameters = RingParameters()
let cpus = availableCPUs
print("ring-ratio: hardened DriverQueue vs trusting baseline; same DeviceQueue, RingPair, BouncePool")
print("machine: \(cpus) CPUs usable, \(cpuModel()); load average at start: \(loadAverage())")
print(
    "queue \(parameters.queueSize), batch \(parameters.batch), \(parameters.payloadBytes)-byte buffers"
        + " (2 descriptors per request), \(options.rounds) interleaved rounds, medians")
print("")
print(
    pad("scenario", 18) + pad("hardened", 26) + pad("trusting", 26) + pad("ratio h/t [min .. max]", 28)
        + "best-of ratio")

var worst = Double.infinity
for scenario in options.scenarios {
    if scenario.needsDeviceThread && cpus < 2 {
        print(pad(scenario.rawValue, 18) + "skipped: needs 2 CPUs")
        continue
    }
    let ops = scenario == .oneThreadBatch || scenario == .twoThreadBatch
        ? options.batchOperations : options.latencyOperations
    // Fresh rings per scenario; both exist side by side for the whole scenario.
    let runners: [any RingRunner]
    do {
        runners = try [makeRunner(.hardened, parameters: parameters), makeRunner(.trusting, parameters: parameters)]
    } catch {
        print("cannot set up the rings: \(error)")
        exit(1)
    }
    // Warm-up: page faults, caches, branch predictors.
    for r in runners { _ = r.run(scenario, operations: max(1, ops / 4)) }
    var ns: [[Double]] = [[], []]
    var ratios: [Double] = []
    for round in 0..<options.rounds {
        let order = round % 2 == 0 ? [0, 1] : [1, 0]
        var perOp = [0.0, 0.0]
        for i in order {
            let t = runners[i].run(scenario, operations: ops)
            // 1-thread: the driver thread's CPU time (immune to being descheduled by other
            // load); 2-thread: wall clock (the device thread's pace is part of the result).
            perOp[i] = (scenario.needsDeviceThread ? t.wall : t.threadCPU) / Double(ops)
            ns[i].append(perOp[i])
        }
        ratios.append(perOp[1] / perOp[0])  // hardened speed / trusting speed
    }
    let h = median(ns[0])
    let t = median(ns[1])
    let r = median(ratios)
    worst = min(worst, r)
    func cell(_ perOp: Double) -> String {
        "\(f(perOp, 1)) ns  (\(f(1e3 / perOp, 2)) M/s)"
    }
    // Best-of (fastest round of each driver): the estimate least disturbed by other load.
    let best = (ns[1].min() ?? .nan) / (ns[0].min() ?? .nan)
    print(
        pad(scenario.rawValue, 18) + pad(cell(h), 26) + pad(cell(t), 26)
            + pad("\(f(r, 3))x [\(f(ratios.min() ?? .nan, 3)) .. \(f(ratios.max() ?? .nan, 3))]", 28)
            + "\(f(best, 3))x")
}
print("")
print("load average at end: \(loadAverage())")
print("ns = time per round trip (batch: amortized; latency: one request in flight); M/s = round trips per second")
print("1-thread rows: CPU time of the thread (CLOCK_THREAD_CPUTIME_ID); 2-thread rows: wall clock")
print("ratio = hardened speed / trusting speed, median of per-round ratios; best-of = fastest round vs fastest round")
if worst.isFinite {
    print("lowest median ratio: \(f(worst, 3))x (target >= 0.97x): \(worst >= 0.97 ? "met" : "NOT met")")
}
