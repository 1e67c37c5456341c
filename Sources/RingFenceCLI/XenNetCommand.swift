import Adversary
import ArgumentParser
import Foundation
import RingFenceResults
import SharedMemory
import VirtioBlock
import XenRing

#if canImport(Glibc)
import Glibc
#endif

/// `ringfence serve-xen-net`: the hardened netif backend, every connection on its own
/// thread; a frontend that corrupts a ring is dropped, the others go on.
struct ServeXenNetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-xen-net",
        abstract: "Serve Xen-style netif frontends over emulated PV rings.",
        discussion: helpDiscussion(
            "Listens on a Unix socket; each connection runs the xenstore-like handshake, maps the frontend's grant table and frames (sealed memfds) and serves its tx and rx rings: --loopback sends every frame back, --switch forwards between the connected frontends (learning source MACs), --sink drops them. --attack makes this backend misbehave (for audits).",
            examples: "ringfence serve-xen-net --socket xnet.sock --loopback",
            "ringfence serve-xen-net --socket xnet.sock --switch --metrics 127.0.0.1:9101"))

    enum Mode: String, EnumerableFlag {
        case loopback, `switch`, sink
        var netMode: XenNetMode { XenNetMode(rawValue: rawValue) ?? .loopback }
    }

    @Option(help: "Unix socket path to listen on.")
    var socket: String

    @Flag(help: "Where frames go.")
    var mode: Mode = .loopback

    @Option(help: "Stop after this many connections ended (0 = serve forever).")
    var connections: Int = 0

    @Option(help: "Seconds without traffic before a connection is closed.")
    var idle: Double = 30

    @OptionGroup var metricsOptions: MetricsOptions

    @Option(help: "Misbehave: \(XenNetBackendAttack.allCases.map(\.rawValue).joined(separator: ", ")).")
    var attack: String?

    func validate() throws {
        if let attack, XenNetBackendAttack(rawValue: attack) == nil {
            throw ValidationError("unknown attack \(attack)")
        }
        guard connections >= 0 else { throw ValidationError("--connections must be >= 0") }
        guard idle > 0, idle <= 3600 else { throw ValidationError("--idle must be in (0, 3600]") }
    }

    func run() throws {
        let listener: UnixListener
        do { listener = try UnixListener(path: socket) } catch {
            FileHandle.standardError.write(Data("ringfence serve-xen-net: error: \(error)\n".utf8))
            throw ExitCode(1)
        }
        let attack = self.attack.flatMap(XenNetBackendAttack.init(rawValue:))
        // SIGUSR1 (blocked before any thread exists) logs the metrics; INT and TERM keep
        // their default action.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGUSR1)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let serverMetrics = ServerMetrics(server: "serve-xen-net", zeros: ServerMetrics.netCounters)
        let endpoint = try metricsOptions.start(serverMetrics) {
            FileHandle.standardError.write(Data("serve-xen-net: \($0)\n".utf8))
        }
        defer { endpoint?.removeSocket() }
        let dumpMetrics: @Sendable () -> Void = {
            FileHandle.standardError.write(Data("serve-xen-net: metrics (SIGUSR1):\n\(serverMetrics.text)".utf8))
        }
        try startSignalWaiter(signals, onDump: dumpMetrics) { _ in }
        print("serve-xen-net: \(mode.rawValue) on \(socket)\(attack.map { " (attack \($0.rawValue))" } ?? "")")
        let hub = XenNetSwitch()
        let group = DispatchGroup()
        let netMode = mode.netMode
        let idle = self.idle
        var accepted = 0
        while connections == 0 || accepted < connections {
            guard let channel = try? listener.accept(until: .after(seconds: 3600)) else { continue }
            accepted += 1
            let n = accepted
            group.enter()
            Thread.detachNewThread { [group] in
                defer { group.leave() }
                Self.serveOne(
                    channel, mode: netMode, hub: hub, idle: idle, number: n, attack: attack, metrics: serverMetrics)
            }
        }
        group.wait()
    }

    static func serveOne(
        _ channel: UnixChannel, mode: XenNetMode, hub: XenNetSwitch, idle: Double, number: Int,
        attack: XenNetBackendAttack?, metrics: ServerMetrics
    ) {
        metrics.connected(number)
        defer { metrics.disconnected() }
        do {
            let connection = try XenNetBackendConnection.accept(
                channel: channel, mode: mode, hub: hub, hooks: attack.map(XenNetBackendAdversary.init))
            // Counts reach the metrics while the frontend is served: at most every 10 ms
            // while frames flow, at once when the rings go quiet, and at the end.
            var live = LiveCounts()
            let end = connection.run(idleTimeout: idle) { c, quiet in
                live.push(c.counterValues, to: metrics, connection: number, force: quiet)
            }
            live.push(connection.counterValues, to: metrics, connection: number, force: true)
            let b = connection.backend
            if case .dropped(let v) = end { metrics.violation(v.rule, connection: number) }
            print(
                "serve-xen-net: connection \(number) \(end): \(b.txFrames) frames in (\(connection.bytesReceived) bytes), "
                    + "\(b.rxFrames) out, \(b.rejectedFrames) rejected, \(connection.port.dropped) dropped"
                    + (b.lastRejection.map { " (last: \($0))" } ?? ""))
        } catch {
            metrics.refused(connection: number)
            print("serve-xen-net: connection \(number) refused: \(error)")
        }
    }
}

/// `ringfence xen-net`: the hardened netif frontend. Exit 0 ok, 1 device or violation
/// error (one line naming the rule), 2 usage.
struct XenNet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xen-net",
        abstract: "Talk to a Xen-style netif backend through the hardened netfront.",
        discussion: helpDiscussion(
            "The back-end is `ringfence serve-xen-net` (Xen's netif protocol over emulated PV rings). Frame sizes are in bytes (64, 1500, 9k, 64k). Exit 0 ok, 1 on a device error or a broken rule (one line naming it), 2 on a usage error.",
            examples: "ringfence serve-xen-net --socket xnet.sock --loopback &",
            "ringfence xen-net --socket xnet.sock ping --count 10 --size 1500",
            "ringfence xen-net --socket xnet.sock bench --size 64 --iodepth 64"),
        subcommands: [XenNetInfoCommand.self, XenNetPing.self, XenNetBench.self])

    @Option(help: "Path of the back-end's Unix socket.")
    var socket: String

    @Option(help: ArgumentHelp("Deadline in seconds for connecting and for each wait."))
    var timeout: Double = 5

    func validate() throws {
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be in (0, 3600]") }
    }

    func open() throws -> XenNetFrontendDevice {
        try orExit { () throws(XenConnectError) -> XenNetFrontendDevice in
            let deadline = Deadline.after(seconds: timeout)
            let channel: UnixChannel
            do throws(UnixChannel.Error) { channel = try UnixChannel.connect(path: socket, until: deadline) } catch {
                throw .channel(error)
            }
            let device = try XenNetFrontendDevice.connect(channel: channel, until: deadline)
            device.timeout = timeout
            return device
        }
    }
}

/// One line on stderr and exit 1 for a device or violation error.
func orExit<T, E: Error>(_ body: () throws(E) -> T) throws -> T {
    try orExit("xen-net", body)
}

struct XenNetInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "Show the validated handshake.",
        discussion: helpDiscussion(
            "MAC, features and ring sizes from the handshake, after the frontend checked them.",
            examples: "ringfence xen-net --socket xnet.sock info", "ringfence xen-net --socket xnet.sock info --json"))
    @ParentCommand var net: XenNet
    @Flag(help: "Print the result as JSON.") var json = false

    func run() throws {
        let device = try net.open()
        defer { device.disconnect() }
        let i = device.info
        let f = device.front
        if json {
            printJSON(
                XenNetInfoResult(
                    mac: i.macString, rxCopy: true, sg: i.scatterGather, gsoTcpv4: i.gsoTCPv4,
                    maxQueues: Int(i.maxQueues),
                    txRing: f.txRingSize, rxRing: f.rxRingSize, rxPosted: f.rxPosted, txPages: f.availableTxPages))
        } else {
            print("mac:           \(i.macString)")
            print("features:      rx-copy, \(i.scatterGather ? "sg" : "no sg"), \(i.gsoTCPv4 ? "gso-tcpv4" : "no gso")")
            print("queues:        1 (backend offers \(i.maxQueues))")
            print("rings:         tx \(f.txRingSize) slots, rx \(f.rxRingSize) slots")
            print("pages:         \(f.rxPosted) rx posted, \(f.availableTxPages) tx bounce")
        }
    }
}

/// An Ethernet frame to the backend's MAC from a locally administered one (ethertype
/// 0x88b5, local experimental) carrying `sequence` and a pattern.
func pingFrame(to mac: [UInt8], size: Int, sequence: Int) -> [UInt8] {
    var frame = mac + [0x02, 0, 0, 0, 0, 0x01] + [0x88, 0xb5]
    for i in frame.count..<size { frame.append(UInt8(truncatingIfNeeded: i &* 31 &+ sequence)) }
    if size >= 18 {
        for k in 0..<4 { frame[14 + k] = UInt8(truncatingIfNeeded: sequence >> (8 * k)) }
    }
    return Array(frame.prefix(size))
}

struct XenNetPing: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ping", abstract: "Send frames and check each comes back byte for byte (loopback backend).",
        discussion: helpDiscussion(
            "", examples: "ringfence xen-net --socket xnet.sock ping",
            "ringfence xen-net --socket xnet.sock ping --count 100 --size 9k --json"))
    @ParentCommand var net: XenNet
    @Option(help: "Frames to send.") var count: Int = 4
    @Option(help: "Frame size in bytes (14...65535; 4k etc. allowed).") var size: Size = Size(64)
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        guard count >= 1, count <= 1_000_000 else { throw ValidationError("--count must be 1...1000000") }
        guard size.bytes >= 14, size.bytes <= NetifLayout.maxFrameSize else {
            throw ValidationError("--size must be 14...65535")
        }
    }

    func run() throws {
        let device = try net.open()
        defer { device.disconnect() }
        var buffer = [UInt8](repeating: 0, count: 65536)
        var received = 0
        var mismatched = 0
        var rtts: [UInt64] = []
        for seq in 0..<count {
            let frame = pingFrame(to: device.info.mac, size: size.bytes, sequence: seq)
            let start = monotonicNanoseconds()
            try orExit { try frame.withUnsafeBytes { try device.send($0, token: UInt64(seq)) } }
            let got = try orExit { () throws -> NetReceivedFrame? in
                try buffer.withUnsafeMutableBytes { try device.receive(into: $0, until: .after(seconds: net.timeout)) }
            }
            let ns = monotonicNanoseconds() - start
            let us = Double(ns) / 1000
            guard let got else {
                if !json { print("seq \(seq): no reply within \(format(net.timeout, 1)) s") }
                continue
            }
            received += 1
            let ok = got.status == .okay && got.length == frame.count && Array(buffer[0..<got.length]) == frame
            if !ok { mismatched += 1 }
            rtts.append(ns)
            if !json {
                print("\(got.length) bytes: seq \(seq) time \(format(us, 1)) us\(ok ? "" : " MISMATCH")")
            }
        }
        let result = PingResult(
            sent: count, received: received, mismatched: mismatched, size: size.bytes, latNs: LatencyNs(samples: rtts))
        if json {
            printJSON(result)
        } else {
            let lat = result.latNs
            func us(_ ns: Double) -> String { format(ns / 1000, 1) }
            print(
                "\(count) sent, \(received) received, \(mismatched) mismatched; rtt min/mean/max "
                    + "\(us(Double(lat?.min ?? 0)))/\(us(lat?.mean ?? 0))/\(us(Double(lat?.max ?? 0))) us")
        }
        if received < count || mismatched > 0 { throw ExitCode(1) }
    }
}

struct XenNetBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Send frames as fast as the ring allows; frames/s and MiB/s both ways.",
        discussion: helpDiscussion(
            "Frames/s and MiB/s each second on a terminal and in all; --json at the end.",
            examples: "ringfence xen-net --socket xnet.sock bench",
            "ringfence xen-net --socket xnet.sock bench --size 9k --runtime 10 --json"))
    @ParentCommand var net: XenNet
    @Option(help: "Frame size in bytes (14...65535; 1500, 9k, 64k...).") var size: Size = Size(1500)
    @Option(help: "Seconds to run.") var runtime: Double = 5
    @Option(help: "Frames in flight on tx (1...128; default 32).") var iodepth: Int?
    /// The spelling before `--iodepth` (issue 19), still accepted.
    @Option(name: .customLong("depth"), help: .hidden) var oldDepth: Int?
    @Flag(help: "Print the result as JSON.") var json = false

    /// Frames in flight: --iodepth, or the old --depth, 32 by default.
    var depth: Int { iodepth ?? oldDepth ?? 32 }

    func validate() throws {
        if iodepth != nil && oldDepth != nil {
            throw ValidationError("--depth is the old spelling of --iodepth: give one")
        }
        guard size.bytes >= 14, size.bytes <= NetifLayout.maxFrameSize else {
            throw ValidationError("--size must be 14...65535")
        }
        guard runtime > 0, runtime <= 3600 else { throw ValidationError("--runtime must be in (0, 3600]") }
        guard depth >= 1, depth <= 128 else { throw ValidationError("--iodepth must be 1...128") }
    }

    func run() throws {
        let device = try net.open()
        defer { device.disconnect() }
        let frame = pingFrame(to: device.info.mac, size: size.bytes, sequence: 0)
        var buffer = [UInt8](repeating: 0, count: 65536)
        let results = UnsafeMutableBufferPointer<NetReceivedFrame>.allocate(capacity: 64)
        defer { results.deallocate() }
        // The frame in memory of its own, so every entry of `list` may point at it for the run.
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: frame.count, alignment: 64)
        defer { bytes.deallocate() }
        frame.withUnsafeBytes { bytes.copyMemory(from: $0) }
        let list = UnsafeMutableBufferPointer<UnsafeRawBufferPointer>.allocate(capacity: depth)
        defer { list.deallocate() }
        list.initialize(repeating: UnsafeRawBufferPointer(bytes))
        let start = monotonicNanoseconds()
        let end = start &+ UInt64(runtime * 1e9)
        var nextProgress = start &+ 1_000_000_000
        let progressLine = ProgressLine(json: json)
        var received = 0
        var token: UInt64 = 0
        var failure: (any Error)?
        loop: while monotonicNanoseconds() < end {
            do {
                // One pass in the overlapping order (`exchange`): tx completions reaped, up to
                // `depth` frames in flight posted and the backend kicked, then a batch of echoes
                // validated and copied out (each over the last) while the backend works.
                let pass = try buffer.withUnsafeMutableBytes { out in
                    try device.exchange(
                        sending: UnsafeBufferPointer(list), firstToken: token, inFlightLimit: depth, into: out,
                        stride: 0, results: results)
                }
                token &+= UInt64(pass.sent)
                received += pass.received
                if !pass.progressed { try device.waitForWork(until: .after(seconds: net.timeout)) }
            } catch {
                failure = error
                break loop
            }
            let now = monotonicNanoseconds()
            if now >= nextProgress {
                let elapsed = Double(now - start) / 1e9
                let fps = Double(device.txCompleted) / elapsed
                progressLine.show(
                    "[\(format(elapsed, 0))s/\(format(runtime, 0))s] \(format(fps, 0)) frames/s, "
                        + "\(format(fps * Double(size.bytes) / 1_048_576, 1)) MiB/s")
                nextProgress = now &+ 1_000_000_000
            }
        }
        progressLine.clear()
        let elapsed = Double(monotonicNanoseconds() - start) / 1e9
        let sent = device.txCompleted
        let result = NetBenchResult(
            direction: "both", size: size.bytes, ring: "xen", depth: depth, seconds: elapsed, txFrames: UInt64(sent),
            rxFrames: UInt64(received), txFailed: UInt64(device.txFailed), error: failure.map { "\($0)" })
        if json {
            printJSON(result)
        } else {
            let mib = result.txMpps * 1e6 * Double(size.bytes) / 1_048_576
            print("xen-net bench: \(size.bytes)-byte frames, depth \(depth), \(format(elapsed, 2)) s")
            print(
                "  tx: \(sent) frames = \(format(result.txMpps * 1e6, 0)) frames/s, \(format(mib, 1)) MiB/s, "
                    + "\(device.txFailed) failed")
            print("  rx: \(received) frames = \(format(result.rxMpps * 1e6, 0)) frames/s")
        }
        if let failure {
            FileHandle.standardError.write(Data("ringfence xen-net: error: \(failure)\n".utf8))
            throw ExitCode(1)
        }
        if device.txFailed > 0 { throw ExitCode(1) }
    }
}

extension XenNetBackendConnection {
    /// tx: the frames the frontend sent; rx: those it received (serve-net's names).
    var counterValues: CounterValues {
        .net(
            txFrames: backend.txFrames, txBytes: bytesReceived, rxFrames: backend.rxFrames, rxBytes: backend.rxBytes,
            rxDropped: port.dropped, violations: backend.rejectionsByRule)
    }
}

/// What a connection counted that `ServerMetrics` has not seen yet, pushed from the
/// serving thread at most every 10 ms (or when forced).
struct LiveCounts {
    var pushed: CounterValues = [:]
    var lastPush: UInt64 = 0

    mutating func push(_ now: @autoclosure () -> CounterValues, to metrics: ServerMetrics, connection: Int, force: Bool)
    {
        let time = monotonicNanoseconds()
        guard force || time &- lastPush >= 10_000_000 else { return }
        lastPush = time
        let values = now()
        var delta: CounterValues = [:]
        for (key, n) in values where n != pushed[key, default: 0] { delta[key] = n - pushed[key, default: 0] }
        guard !delta.isEmpty else { return }
        pushed = values
        metrics.add(delta, connection: connection)
    }
}
