// blk-ratio: virtio-blk 4 KiB randread, two contestants interleaved in one process.
//
//   blk-ratio drivers --backend NAME=SOCKET...   hardened VirtioBlockDriver vs the trusting
//                                               baseline, against each back-end (issue 3:
//                                               hardened >= 0.95x trusting IOPS)
//   blk-ratio async --socket SOCKET             async reads from a task group (on the
//                                               pool, and on the device's executor) vs the
//                                               synchronous queue API, one back-end, with a
//                                               1 ms Task.sleep ticker beside them (issue 20:
//                                               >= 0.8x, ticker lateness p99 < 5 ms)
//   blk-ratio wait --socket SOCKET             the hardened driver's wait strategies (poll,
//                                               adaptive, interrupts) vs the C busy-polling
//                                               driver, one back-end (issue 19: poll >= 1.0x,
//                                               adaptive >= 0.9x at iodepth 1; >= 1.0x at 32)
//   blk-ratio devices --device NAME=SOCKET --device NAME=SOCKET
//                                               the hardened driver against two back-ends
//                                               (issue 4: serve-blk >= 1.0x qsd)
//
// Every point runs `rounds` rounds; a round connects, warms up, measures runtime/rounds
// seconds and disconnects, for each contestant in turn, alternating which goes first.
// The back-ends are started by scripts/bench-blk (or by hand).
import Foundation
import SharedMemory

func usage(_ code: Int32 = 2) -> Never {
    print(
        """
        usage: blk-ratio drivers --backend NAME=SOCKET [--backend NAME=SOCKET]... [options]
               blk-ratio devices --device NAME=SOCKET --device NAME=SOCKET [options]
               blk-ratio async --socket SOCKET [options]   (async calls vs queue API)
               blk-ratio wait --socket SOCKET [options]    (wait strategies vs the C poller)
               blk-ratio check --socket SOCKET   (both drivers read the same random blocks
                                                  and must return the same bytes)
               blk-ratio poll-cost --socket SOCKET   (ns per empty poll of each driver)
               blk-ratio run --driver hardened|trusting|cpoller|async|async-executor --socket SOCKET [options]
                             [--wait poll|adaptive|interrupts]
                             (one contestant, one round per depth: for profilers;
                             --wait: the hardened driver's strategy, default adaptive)
          --depth N      iodepth (repeatable; default 1 and 32)
          --runtime S    measured seconds per contestant per point (default 10)
          --rounds N     interleaved rounds the runtime is split into (default 5)
          --warmup S     unmeasured seconds at the start of every round (default 0.5)
          --bs N         request size in bytes (default 4096)
          --spin N       polls before a driver blocks on its call eventfd, both drivers
                         (default 256, the library's default)
          --quick        --runtime 2 --rounds 2 --warmup 0.2 (smoke test)
        """)
    exit(code)
}

enum Mode: String {
    case drivers, devices, run, check, async, wait
    case pollCost = "poll-cost"
}

func parse() -> (Mode, Settings, [(String, String)]) {
    var args = CommandLine.arguments.dropFirst()
    guard let modeName = args.popFirst() else { usage() }
    if modeName == "--help" || modeName == "-h" { usage(0) }
    guard let mode = Mode(rawValue: modeName) else { usage() }
    var settings = Settings()
    var targets: [(String, String)] = []
    var depths: [Int] = []
    var driver = DriverKind.hardened
    var wait: WaitStrategy?
    func value() -> String {
        guard let v = args.popFirst() else { usage() }
        return v
    }
    func positive(_ s: String) -> Double {
        guard let d = Double(s), d > 0 else { usage() }
        return d
    }
    while let a = args.popFirst() {
        switch a {
        case "--backend", "--device":
            let v = value()
            guard let eq = v.firstIndex(of: "="), eq != v.startIndex else { usage() }
            targets.append((String(v[..<eq]), String(v[v.index(after: eq)...])))
        case "--driver":
            guard let d = DriverKind(rawValue: value()) else { usage() }
            driver = d
        case "--socket": targets.append((driver.rawValue, value()))
        case "--wait":
            switch value() {
            case "poll": wait = .poll
            case "adaptive": wait = .adaptive
            case "interrupts": wait = .interrupts
            default: usage()
            }
        case "--depth": depths.append(Int(positive(value())))
        case "--runtime": settings.runtime = positive(value())
        case "--rounds": settings.rounds = Int(positive(value()))
        case "--warmup":
            guard let w = Double(value()), w >= 0 else { usage() }
            settings.warmup = w
        case "--bs": settings.blockSize = Int(positive(value()))
        case "--spin":
            guard let n = Int(value()), n >= 0 else { usage() }
            settings.spinIterations = n
        case "--quick":
            settings.runtime = 2
            settings.rounds = 2
            settings.warmup = 0.2
        case "--help", "-h": usage(0)
        default: usage()
        }
    }
    if !depths.isEmpty { settings.depths = depths }
    guard !targets.isEmpty, mode != .devices || targets.count == 2, mode != .run || targets.count == 1,
        mode != .check || targets.count == 1, mode != .pollCost || targets.count == 1,
        mode != .async || targets.count == 1, mode != .wait || targets.count == 1
    else { usage() }
    if mode == .pollCost {
        guard let (h, t) = pollCost(socket: targets[0].1, polls: 2_000_000) else {
            log("blk-ratio poll-cost: failed")
            exit(1)
        }
        print(String(format: "empty poll(): hardened %.1f ns, trusting %.1f ns", h, t))
        exit(0)
    }
    if mode == .check {
        if let problem = crossCheck(socket: targets[0].1, blockSize: settings.blockSize, count: 2000) {
            log("blk-ratio check: \(problem)")
            exit(1)
        }
        print("blk-ratio check: 2000 random \(settings.blockSize)-byte blocks read identically by both drivers")
        exit(0)
    }
    if mode == .run { targets = [(driver.rawValue, targets[0].1)] }
    settings.wait = wait
    if mode == .async {
        settings.ticker = true
        if depths.isEmpty { settings.depths = [32] }
    }
    return (mode, settings, targets)
}

let (mode, settings, targets) = parse()

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

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return .nan }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

func log(_ s: String) { FileHandle.standardError.write(Data((s + "\n").utf8)) }

func grouped(_ x: Double) -> String {
    let n = Int(x.rounded())
    let s = String(n)
    var out = ""
    for (i, ch) in s.reversed().enumerated() {
        if i > 0 && i % 3 == 0 { out.append(",") }
        out.append(ch)
    }
    return String(out.reversed())
}

func f(_ x: Double, _ digits: Int = 1) -> String { String(format: "%.\(digits)f", x) }

func cells(_ r: RunResult) -> String {
    "\(grouped(r.iops)) | \(f(r.percentileMicroseconds(50))) | \(f(r.percentileMicroseconds(99)))"
}

func ratioCell(_ p: PairResult) -> String {
    let rs = p.roundRatios
    guard let lo = rs.min(), let hi = rs.max() else { return "n/a" }
    return "\(f(p.ratio, 3))× | \(f(median(rs), 3))× [\(f(lo, 3)) .. \(f(hi, 3))]"
}

let startDate = ISO8601DateFormatter().string(from: Date())
print("blk-ratio \(mode.rawValue): \(startDate), \(ProcessInfo.processInfo.activeProcessorCount) CPUs, \(cpuModel())")
print(
    "randread bs=\(settings.blockSize), \(f(settings.runtime)) s measured per contestant per point in \(settings.rounds) interleaved rounds (+\(f(settings.warmup)) s warm-up each), \(settings.spinIterations) polls before blocking, load average at start: \(loadAverage())"
)
print("")
var failed = false
switch mode {
case .drivers:
    print(
        "| back-end | iodepth | hardened IOPS | p50 µs | p99 µs | trusting IOPS | p50 µs | p99 µs | ratio h/t (totals) | median of rounds [range] |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, socket) in targets {
        for depth in settings.depths {
            log("\(name), iodepth \(depth) (load \(loadAverage())):")
            let p = comparePair(
                Contestant(label: "hardened", driver: .hardened, socket: socket),
                Contestant(label: "trusting", driver: .trusting, socket: socket), depth: depth, settings: settings,
                log: log)
            print("| \(name) | \(depth) | \(cells(p.a)) | \(cells(p.b)) | \(ratioCell(p)) |")
            for e in [p.a.error, p.b.error].compactMap({ $0 }) {
                failed = true
                log("error: \(e)")
            }
        }
    }
case .devices:
    let (aName, aSocket) = targets[0]
    let (bName, bSocket) = targets[1]
    print(
        "| iodepth | \(aName) IOPS | p50 µs | p99 µs | \(bName) IOPS | p50 µs | p99 µs | ratio \(aName)/\(bName) (totals) | median of rounds [range] |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for depth in settings.depths {
        log("hardened driver, iodepth \(depth) (load \(loadAverage())):")
        let p = comparePair(
            Contestant(label: aName, driver: .hardened, socket: aSocket),
            Contestant(label: bName, driver: .hardened, socket: bSocket), depth: depth, settings: settings, log: log)
        print("| \(depth) | \(cells(p.a)) | \(cells(p.b)) | \(ratioCell(p)) |")
        for e in [p.a.error, p.b.error].compactMap({ $0 }) {
            failed = true
            log("error: \(e)")
        }
    }
case .async:
    let socket = targets[0].1
    // The queue API first: every ratio is against it, round by round.
    let contestants = [
        Contestant(label: "queue API", driver: .hardened, socket: socket),
        Contestant(label: "async, default pool", driver: .async, socket: socket),
        Contestant(label: "async, device executor", driver: .asyncExecutor, socket: socket),
    ]
    print(
        "| iodepth | driver | IOPS | p50 µs | p99 µs | vs queue API (totals) | median of rounds [range] | ticker lateness p50 / p99 / max ms |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    func lateness(_ r: RunResult) -> String {
        guard let t = r.ticker else { return "n/a" }
        func ms(_ p: Double) -> String { f(Double(t.valueAtPercentile(p)) / 1e6, 2) }
        return "\(ms(50)) / \(ms(99)) / \(f(Double(t.max) / 1e6, 2))"
    }
    for depth in settings.depths {
        log("async vs queue API, iodepth \(depth) (load \(loadAverage())):")
        let g = compareGroup(contestants, depth: depth, settings: settings, log: log)
        let base = g.merged[0]
        for (i, c) in contestants.enumerated() {
            let m = g.merged[i]
            var ratio = "1"
            var rounds = ""
            if i > 0 {
                let rs = g.roundRatios(i, to: 0)
                ratio = base.iops > 0 ? "\(f(m.iops / base.iops, 3))×" : "n/a"
                rounds = rs.isEmpty ? "n/a" : "\(f(median(rs), 3))× [\(f(rs.min() ?? 0, 3)) .. \(f(rs.max() ?? 0, 3))]"
            }
            print(
                "| \(depth) | \(c.label) | \(cells(m)) | \(ratio) | \(rounds) | \(lateness(m)) |")
            if let e = m.error {
                failed = true
                log("error: \(c.label): \(e)")
            }
        }
    }
case .wait:
    let socket = targets[0].1
    let contestants = [
        Contestant(label: "C poller", driver: .cpoller, socket: socket),
        Contestant(label: "ours --poll", driver: .hardened, socket: socket, wait: .poll),
        Contestant(label: "ours default", driver: .hardened, socket: socket, wait: .adaptive),
        Contestant(label: "ours --spin-us 0", driver: .hardened, socket: socket, wait: .interrupts),
    ]
    print("| iodepth | driver | IOPS | p50 µs | p99 µs | vs C poller: median of rounds [range] | target |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for depth in settings.depths {
        log("wait strategies vs the C poller, iodepth \(depth) (load \(loadAverage())):")
        let g = compareGroup(contestants, depth: depth, settings: settings, log: log)
        for (i, c) in contestants.enumerated() {
            let rs = g.roundRatios(i, to: 0)
            let ratio = rs.isEmpty ? "n/a" : "\(f(median(rs), 3))× [\(f(rs.min() ?? 0, 3)) .. \(f(rs.max() ?? 0, 3))]"
            let target: String
            switch (i, depth) {
            case (0, _), (3, _): target = ""
            case (1, 1): target = ">= 1.0×"
            case (2, 1): target = ">= 0.9×"
            default: target = ">= 1.0×"
            }
            let m = g.merged[i]
            print(
                "| \(depth) | \(c.label) | \(grouped(median(g.roundIOPS.map { $0[i] }))) | \(f(m.percentileMicroseconds(50))) | \(f(m.percentileMicroseconds(99))) | \(ratio) | \(target) |"
            )
            if let e = m.error {
                failed = true
                log("error: \(c.label): \(e)")
            }
        }
    }
case .check, .pollCost:
    break  // handled in parse()
case .run:
    let (name, socket) = targets[0]
    let driver = DriverKind(rawValue: name) ?? .hardened
    print("| driver | iodepth | IOPS | p50 µs | p99 µs |")
    print("|---|---:|---:|---:|---:|")
    for depth in settings.depths {
        let r = runRound(
            Contestant(label: name, driver: driver, socket: socket, wait: settings.wait), depth: depth,
            settings: settings,
            seconds: settings.runtime, seed: 0x2545_f491_4f6c_dd1d)
        print("| \(name) | \(depth) | \(cells(r)) |")
        log(
            "\(name) iodepth \(depth): \(r.requests) requests, \(r.kicks) kicks\(driver == .trusting ? ", \(r.sleeps) sleeps" : "")"
        )
        #if RINGFENCE_SPLIT_PROBE
        if let split = r.split { log("\(name) \(describe(split))") }
        #endif
        if let e = r.error {
            failed = true
            log("error: \(e)")
        }
    }
}
print("")
print("load average at end: \(loadAverage())")
exit(failed ? 1 : 0)
