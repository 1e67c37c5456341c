// ring-ratio: hardened drivers vs the trusting baselines (split and packed), and packed vs
// split, interleaved in one process.
//
// Each round runs every scenario once per driver, alternating which driver goes first
// (ABBA), so drift in machine load hits both alike. Reported: the median over rounds of
// each driver's time per round trip, and the median of the per-round ratios
// hardened speed / trusting speed (1.00 = free hardening; docs/design.md §5 asks >= 0.97).
import Foundation
import RingWorkload

struct Options {
    var rounds = 9
    var batchOperations = 1 << 18
    var latencyOperations = 1 << 16
    var ringtestOperations = 1 << 20
    /// tools/virtio/ringtest's `virtio_ring_0_9` (scripts/bench-ringtest builds it).
    var ringtestBinary: String?
    var scenarios = Scenario.allCases
}

func usage(_ code: Int32 = 2) -> Never {
    print("""
        usage: ring-ratio [--rounds N] [--batch-ops N] [--latency-ops N] [--quick]
                          [--scenario 1b|2b|1l|2l|rt]... [--rt-ops N] [--ringtest-bin PATH]
          --rounds N       interleaved rounds per scenario (default 9; median reported)
          --batch-ops N    round trips per round in the batch scenarios (default 262144)
          --latency-ops N  round trips per round in the latency scenarios (default 65536)
          --rt-ops N       buffers per round in the ringtest scenario (default 1048576)
          --ringtest-bin P Linux tools/virtio/ringtest virtio_ring_0_9, run as a fifth
                           contestant of the rt scenario (--run-cycles N, ring 256, batch 1,
                           polling, guest on CPU 0, host on CPU 1; scripts/bench-ringtest)
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
        case "--rt-ops": o.ringtestOperations = int(a)
        case "--ringtest-bin":
            guard let path = args.popFirst() else { usage() }
            o.ringtestBinary = path
        case "--quick":
            o.rounds = 3
            o.batchOperations /= 8
            o.latencyOperations /= 8
            o.ringtestOperations /= 8
        case "--scenario":
            switch args.popFirst() {
            case "1b": picked.append(.oneThreadBatch)
            case "2b": picked.append(.twoThreadBatch)
            case "1l": picked.append(.oneThreadLatency)
            case "2l": picked.append(.twoThreadLatency)
            case "rt": picked.append(.ringtest)
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
let kinds: [DriverKind] = [.hardened, .trusting, .packedHardened, .packedTrusting]
print("ring-ratio: hardened vs trusting drivers, split (DriverQueue) and packed (PackedDriverQueue);")
print("            same hardened device (DeviceQueue / PackedDeviceQueue), same region, BouncePool; all four interleaved")
print("machine: \(cpus) CPUs usable, \(cpuModel()); load average at start: \(loadAverage())")
print(
    "queue \(parameters.queueSize), batch \(parameters.batch), \(parameters.payloadBytes)-byte buffers"
        + " (2 descriptors per request), \(options.rounds) interleaved rounds, medians")
print("")

struct Row {
    var scenario: Scenario
    var perOp: [Double]  // median ns per round trip, per kind
    var ratios: [[Double]]  // per-round ratios: split h/t, packed h/t, packed/split (hardened)
    var best: [Double]
}
/// Runs the C ringtest once; wall nanoseconds (process start to exit), nil on failure.
func runRingtest(_ path: String, cycles: Int) -> Double? {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = [
        "--ring-size", "\(parameters.queueSize)", "--run-cycles", "\(cycles)", "--batch", "1",
        "--guest-affinity", "\(parameters.driverCPU)", "--host-affinity", "\(parameters.deviceCPU)",
    ]
    let start = DispatchTime.now().uptimeNanoseconds
    do { try p.run() } catch { return nil }
    p.waitUntilExit()
    let end = DispatchTime.now().uptimeNanoseconds
    return p.terminationStatus == 0 ? Double(end - start) : nil
}
var ringtestC: [Double] = []  // ns per buffer, per round
var ringtestRatios: [Double] = []  // split hardened ns / C ns, per round
var ringtestSplit: [Double] = []

var rows: [Row] = []
for scenario in options.scenarios {
    if scenario.needsDeviceThread && cpus < 2 {
        print(pad(scenario.rawValue, 18) + "skipped: needs 2 CPUs")
        continue
    }
    let ops = scenario == .ringtest ? options.ringtestOperations
        : scenario == .oneThreadBatch || scenario == .twoThreadBatch
        ? options.batchOperations : options.latencyOperations
    var scenarioParameters = parameters
    if scenario == .ringtest { scenarioParameters.batch = 1 }  // ringtest's default --batch 1
    let runners: [any RingRunner]
    do {
        runners = try kinds.map { try makeRunner($0, parameters: scenarioParameters) }
    } catch {
        print("cannot set up the rings: \(error)")
        exit(1)
    }
    for r in runners { _ = r.run(scenario, operations: max(1, ops / 4)) }
    var ns: [[Double]] = Array(repeating: [], count: kinds.count)
    var ratios: [[Double]] = [[], [], []]
    for round in 0..<options.rounds {
        // Rotate who goes first, so drift in load hits every contestant alike.
        let order = (0..<kinds.count).map { (round + $0) % kinds.count }
        var perOp = Array(repeating: 0.0, count: kinds.count)
        // The C ringtest (when given) goes first in odd rounds, last in even ones.
        let withC = scenario == .ringtest ? options.ringtestBinary : nil
        var cWall: Double?
        if let binary = withC, round % 2 == 1 { cWall = runRingtest(binary, cycles: ops) }
        for i in order {
            let t = runners[i].run(scenario, operations: ops)
            perOp[i] = (scenario.needsDeviceThread ? t.wall : t.threadCPU) / Double(ops)
            ns[i].append(perOp[i])
        }
        if let binary = withC {
            if round % 2 == 0 { cWall = runRingtest(binary, cycles: ops) }
            guard let c = cWall else {
                print("\(binary) failed")
                exit(1)
            }
            ringtestC.append(c / Double(ops))
            ringtestSplit.append(perOp[0])
            ringtestRatios.append(perOp[0] / (c / Double(ops)))
        }
        ratios[0].append(perOp[1] / perOp[0])  // split: hardened speed / trusting speed
        ratios[1].append(perOp[3] / perOp[2])  // packed: hardened / trusting
        ratios[2].append(perOp[0] / perOp[2])  // hardened: packed speed / split speed
    }
    let best = [
        (ns[1].min() ?? .nan) / (ns[0].min() ?? .nan), (ns[3].min() ?? .nan) / (ns[2].min() ?? .nan),
        (ns[0].min() ?? .nan) / (ns[2].min() ?? .nan),
    ]
    rows.append(Row(scenario: scenario, perOp: ns.map(median), ratios: ratios, best: best))
}

func cell(_ perOp: Double) -> String { "\(f(perOp, 1)) ns (\(f(1e3 / perOp, 2)) M/s)" }
print(pad("scenario", 18) + kinds.map { pad($0 == .hardened ? "split hardened" : $0 == .trusting ? "split trusting" : $0.rawValue, 24) }.joined())
for row in rows {
    print(pad(row.scenario.rawValue, 18) + row.perOp.map { pad(cell($0), 24) }.joined())
}
print("")
print(pad("scenario", 18) + pad("split h/t [min .. max]", 30) + pad("packed h/t [min .. max]", 30) + "packed/split, hardened [min .. max]")
var worst = [Double.infinity, Double.infinity]
for row in rows {
    var line = pad(row.scenario.rawValue, 18)
    for k in 0..<3 {
        let r = median(row.ratios[k])
        if k < 2 { worst[k] = min(worst[k], r) }
        line += pad("\(f(r, 3))x [\(f(row.ratios[k].min() ?? .nan, 3)) .. \(f(row.ratios[k].max() ?? .nan, 3))]", 30)
    }
    print(line + "  best-of: \(row.best.map { f($0, 3) }.joined(separator: " / "))")
}
if !ringtestC.isEmpty {
    print("")
    print(
        "ringtest 0.9, ring \(parameters.queueSize), batch 1, polling, \(options.ringtestOperations) buffers per round:"
            + " C virtio_ring_0_9 \(f(median(ringtestC), 1)) ns/buffer, split hardened \(f(median(ringtestSplit), 1))"
            + " ns/buffer (medians)")
    let r = median(ringtestRatios)
    print(
        "split hardened / C ns per buffer: \(f(r, 3))x [\(f(ringtestRatios.min() ?? .nan, 3)) .. "
            + "\(f(ringtestRatios.max() ?? .nan, 3))], best-of \(f((ringtestSplit.min() ?? .nan) / (ringtestC.min() ?? .nan), 3))x"
            + " (target <= 1.0x): \(r <= 1.0 ? "met" : "NOT met")")
}
print("")
print("load average at end: \(loadAverage())")
print("ns = time per round trip (batch: amortized; latency: one request in flight); M/s = round trips per second")
print("1-thread rows: CPU time of the thread (CLOCK_THREAD_CPUTIME_ID); 2-thread rows: wall clock")
print("h/t = hardened speed / trusting speed, median of per-round ratios; packed/split = packed speed / split speed")
print("best-of = fastest round vs fastest round (split h/t / packed h/t / packed/split)")
for (k, name) in ["split", "packed"].enumerated() where worst[k].isFinite {
    print("\(name): lowest median ratio \(f(worst[k], 3))x (target >= 0.97x): \(worst[k] >= 0.97 ? "met" : "NOT met")")
}
