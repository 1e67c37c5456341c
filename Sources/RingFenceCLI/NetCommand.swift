import ArgumentParser
import Foundation
import RingFenceResults
import SharedMemory
import VirtioNet

/// `ringfence net`: a thin shell over `VirtioNet.VirtioNetDriver` and `NetTraffic`.
/// Exit 0 ok, 1 device or violation error (one line naming the rule), 2 usage.
struct Net: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "net",
        abstract: "Talk to a vhost-user-net back-end with the hardened virtio-net driver.",
        discussion: helpDiscussion(
            "The back-end is `ringfence serve-net`, DPDK's vhost PMD (testpmd), QEMU's vhost-user-net or any vhost-user-net device. Frame sizes are in bytes (64, 1500, 9k). Exit 0 ok, 1 on a device error or a broken rule (one line naming it), 2 on a usage error.",
            examples: "ringfence serve-net --socket net.sock --loopback &",
            "ringfence net --socket net.sock ping --count 10 --size 1500",
            "ringfence net --socket net.sock bench --both --size 64 --runtime 5",
            "ringfence net --socket vhost.sock --no-ctrl --queues 2 ping --count 10"),
        subcommands: [NetInfoCommand.self, NetSend.self, NetReceive.self, NetPing.self, NetBench.self])

    @OptionGroup var connection: NetConnection
}

/// What every `net` subcommand takes (before the subcommand's name).
struct NetConnection: ParsableArguments {
    @Option(help: "Path of the back-end's vhost-user socket.")
    var socket: String

    @Option(name: .customLong("queue-size"), help: "Ring size (power of two).")
    var queueSize = 256

    @Option(help: "Deadline in seconds of connecting and of each control command.")
    var timeout: Double = 5

    @Flag(name: .customLong("no-packed"), help: "Use split virtqueues even if packed ones are offered.")
    var noPacked = false

    @Flag(name: .customLong("no-mergeable"), help: "Do not use mergeable receive buffers.")
    var noMergeable = false

    @Flag(
        name: .customLong("no-ctrl"),
        help:
            "Give the back-end no control queue (DPDK's vhost back-end leaves it to QEMU); with --queues > 1 the driver keeps it private and enables the pairs with SET_VRING_ENABLE."
    )
    var noCtrl = false

    @Option(
        help:
            "Queue pairs wanted, 1...16 (fewer if the back-end's GET_QUEUE_NUM or max_virtqueue_pairs says so); ping verifies frames on every pair in turn, send, receive and bench use pair 0."
    )
    var queues = 1

    @Flag(
        help:
            "Listen at --socket and wait for the back-end to connect (DPDK net_vhost with client=1) instead of connecting to it."
    )
    var listen = false

    @Option(name: .customLong("accept-timeout"), help: "With --listen: seconds to wait for the back-end to connect.")
    var acceptTimeout: Double = 30

    @Option(help: "Destination MAC of the frames sent.")
    var dst = "02:00:00:00:00:01"

    func validate() throws {
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be in (0, 3600]") }
        guard queues >= 1, queues <= 16 else { throw ValidationError("--queues must be 1...16") }
        guard parseMAC(dst) != nil else { throw ValidationError("--dst \(dst) is not aa:bb:cc:dd:ee:ff") }
        guard acceptTimeout > 0, acceptTimeout <= 3600 else {
            throw ValidationError("--accept-timeout must be in (0, 3600]")
        }
    }

    var destination: [UInt8] { parseMAC(dst) ?? [2, 0, 0, 0, 0, 1] }

    func open() throws -> VirtioNetDriver {
        var options = VirtioNetDriver.Options()
        options.queueSize = queueSize
        options.queuePairs = queues
        options.controlTimeout = timeout
        options.commandTimeout = timeout
        options.packedRing = !noPacked
        options.mergeableRxBuffers = !noMergeable
        options.controlQueue = !noCtrl
        options.acceptTimeout = acceptTimeout
        return try netOrExit { () throws(NetError) in
            listen
                ? try VirtioNetDriver.listen(socket: socket, options: options)
                : try VirtioNetDriver.connect(socket: socket, options: options)
        }
    }
}

/// Runs a device operation; a `NetError` becomes one line on stderr and exit 1.
func netOrExit<T>(_ body: () throws(NetError) -> T) throws -> T {
    do {
        return try body()
    } catch {
        FileHandle.standardError.write(Data("ringfence net: error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

struct NetInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "Show the validated config.",
        discussion: helpDiscussion(
            "MAC, MTU, status, queue pairs and features, after the driver checked them.",
            examples: "ringfence net --socket net.sock info", "ringfence net --socket net.sock --no-packed info",
            "ringfence net --socket net.sock info --json"))
    @ParentCommand var net: Net
    @Flag(help: "Print the result as JSON.") var json = false
    var connection: NetConnection { net.connection }

    func run() throws {
        let net = try connection.open()
        defer { net.close() }
        let i = net.info
        let r = NetInfoResult(
            mac: formatMAC(i.mac), macReplaced: i.macReplaced, mtu: i.mtu, maxFrame: i.maximumFrame, linkUp: i.linkUp,
            queuePairs: i.queuePairs, maxQueuePairs: i.maximumQueuePairs, ring: net.ringFormat.rawValue,
            mergeableRxBuffers: i.mergeableRxBuffers, controlQueue: i.hasControlQueue,
            controlQueuePrivate: i.controlQueueIsPrivate, features: i.features)
        if json { return printJSON(r) }
        print("mac:         \(r.mac)\(r.macReplaced ? " (random: the device offered none usable)" : "")")
        print("mtu:         \(r.mtu) (frames up to \(r.maxFrame) bytes)")
        print("link:        \(r.linkUp ? "up" : "down")")
        print("queue pairs: \(r.queuePairs) of \(r.maxQueuePairs)")
        print("ring:        \(r.ring)")
        print("rx buffers:  \(r.mergeableRxBuffers ? "mergeable (2048 bytes)" : "one per frame")")
        print(
            "control:     \(r.controlQueue ? "yes" : r.controlQueuePrivate ? "private (pairs enabled with SET_VRING_ENABLE)" : "no")"
        )
        print("features:    0x\(String(r.features, radix: 16))")
    }
}

struct NetSend: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send", abstract: "Send test frames.",
        discussion: helpDiscussion(
            "Frames from this driver's MAC to --dst (broadcast with ff:ff:ff:ff:ff:ff).",
            examples: "ringfence net --socket net.sock send --count 10 --size 1500",
            "ringfence net --socket net.sock --dst ff:ff:ff:ff:ff:ff send"))
    @ParentCommand var net: Net
    var connection: NetConnection { net.connection }
    @Option(help: "Frames to send.") var count = 1
    @Option(help: "Frame size in bytes (14...MTU+18).") var size: Size = Size(64)

    func run() throws {
        let net = try connection.open()
        defer { net.close() }
        let pair = net.pair(0)
        let batch = NetFrameBatch(capacity: 1, frameCapacity: max(14, size.bytes))
        for seq in 0..<count {
            batch.removeAll()
            batch.append(
                NetTraffic.frame(
                    dst: connection.destination, src: net.info.mac, size: size.bytes, sequence: UInt64(seq)))
            let deadline = Deadline.after(seconds: connection.timeout)
            while try netOrExit({ () throws(NetError) in try pair.transmit(batch) }) == 0 {
                guard pair.waitForTransmitRoom(until: deadline) else {
                    FileHandle.standardError.write(Data("ringfence net: error: transmit ring stayed full\n".utf8))
                    throw ExitCode(1)
                }
            }
        }
        // Sent means taken by the device: closing earlier could leave frames on the ring.
        guard pair.waitUntilTransmitted(until: .after(seconds: connection.timeout)) else {
            FileHandle.standardError.write(Data("ringfence net: error: the device did not take every frame\n".utf8))
            throw ExitCode(1)
        }
        print("sent \(count) frame(s) of \(size.bytes) bytes from \(formatMAC(net.info.mac))")
    }
}

struct NetReceive: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive", abstract: "Receive frames and show them.",
        discussion: helpDiscussion(
            "", examples: "ringfence net --socket net.sock receive --count 5",
            "ringfence net --socket net.sock receive --count 100 --wait 30"))
    @ParentCommand var net: Net
    var connection: NetConnection { net.connection }
    @Option(help: "Frames to wait for.") var count = 1
    @Option(help: "Seconds to wait in all.") var wait: Double = 5

    func run() throws {
        let net = try connection.open()
        defer { net.close() }
        let pair = net.pair(0)
        let batch = NetFrameBatch(capacity: 32, frameCapacity: net.info.maximumFrame)
        var got = 0
        let deadline = Deadline.after(seconds: wait)
        while got < count && !deadline.hasPassed {
            batch.removeAll()
            let n = try netOrExit { () throws(NetError) in try pair.receive(into: batch, limit: count - got) }
            for i in 0..<n {
                let f = batch[i]
                let head = f.prefix(32).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
                print("\(f.count) bytes \(formatMAC(Array(f[6..<12]))) > \(formatMAC(Array(f[0..<6]))): \(head)")
            }
            got += n
            if n == 0 { _ = pair.waitForReceive(until: deadline) }
        }
        if got < count {
            FileHandle.standardError.write(Data("ringfence net: received \(got) of \(count) frame(s)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct NetPing: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ping",
        abstract: "Exchange frames with a peer that returns them (serve-net --loopback, testpmd macswap).",
        discussion: helpDiscussion(
            "Every byte of every frame that comes back is verified (the MACs may come back swapped). With --queues N, --count frames on each pair in turn, one line per pair.",
            examples: "ringfence net --socket net.sock ping",
            "ringfence net --socket net.sock ping --count 100 --size 9k"))
    @ParentCommand var net: Net
    var connection: NetConnection { net.connection }
    @Option(help: "Frames to exchange.") var count = 10
    @Option(help: "Frame size in bytes.") var size: Size = Size(64)
    @Option(help: "Seconds to wait for each frame.") var wait: Double = 2
    @Flag(help: "One line per frame.") var verbose = false

    func run() throws {
        let net = try connection.open()
        defer { net.close() }
        let verbose = self.verbose
        let pairs = net.queuePairCount
        var failed = false
        // Each queue pair in turn: a peer that forwards per queue (testpmd with --rxq/--txq)
        // returns a pair's frames on that pair.
        for p in 0..<pairs {
            let r = try netOrExit { () throws(NetError) in
                try NetTraffic.ping(
                    net.pair(p), mac: net.info.mac, dst: connection.destination, size: size.bytes, count: count,
                    timeout: wait
                ) { seq, us in
                    if verbose { print("\(size.bytes) bytes: seq=\(seq) time=\(format(us, 1)) us") }
                }
            }
            print(
                (pairs > 1 ? "pair \(p): " : "")
                    + "\(r.sent) sent, \(r.received) returned intact, \(r.mismatched) wrong; rtt min/avg/max \(format(r.minimumMicroseconds, 1))/\(format(r.averageMicroseconds, 1))/\(format(r.maximumMicroseconds, 1)) us"
            )
            if r.received != count || r.mismatched != 0 { failed = true }
        }
        if failed { throw ExitCode(1) }
    }
}

struct NetBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "testpmd-like throughput: Mpps and Gbit/s, each second and in all.",
        discussion: helpDiscussion(
            "Like testpmd: Mpps and Gbit/s each second on a terminal and in all; --json at the end. --batch is frames per call (testpmd's --burst), not frames in flight: the ring bounds those.",
            examples: "ringfence net --socket net.sock bench --both --size 64 --runtime 5",
            "ringfence net --socket net.sock bench --tx --size 1500 --batch 64 --json"))
    @ParentCommand var net: Net
    var connection: NetConnection { net.connection }
    @Flag(help: "Transmit only.") var tx = false
    @Flag(help: "Receive only.") var rx = false
    @Flag(help: "Transmit and receive.") var both = false
    @Option(help: "Frame size in bytes (64, 1500, 9k...).") var size: Size = Size(64)
    @Option(help: "Seconds to run.") var runtime: Double = 10
    @Option(
        help:
            "Frames per transmit or receive call (a burst, like testpmd --burst; the ring bounds how many are outstanding)."
    ) var batch = 32
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        guard [tx, rx, both].filter({ $0 }).count <= 1 else { throw ValidationError("one of --tx, --rx, --both") }
        guard runtime > 0, runtime <= 3600 else { throw ValidationError("--runtime must be in (0, 3600]") }
        guard batch >= 1, batch <= 1024 else { throw ValidationError("--batch must be 1...1024") }
    }

    func run() throws {
        let net = try connection.open()
        defer { net.close() }
        let direction: NetTraffic.Direction = rx ? .rx : both ? .both : .tx
        let progress = ProgressLine(json: json)
        let r = try netOrExit { () throws(NetError) in
            try NetTraffic.bench(
                net.pair(0), mac: net.info.mac, dst: connection.destination, size: size.bytes, direction: direction,
                seconds: runtime, batchSize: batch
            ) { s in
                progress.show(line(s, prefix: ""))
            }
        }
        progress.clear()
        if json {
            printJSON(
                NetBenchResult(
                    direction: direction.rawValue, size: size.bytes, ring: net.ringFormat.rawValue, depth: batch,
                    seconds: r.seconds, txFrames: r.txFrames, rxFrames: r.rxFrames))
        } else {
            print(line(r, prefix: "total "))
        }
    }

    func line(_ s: NetTraffic.BenchSample, prefix: String) -> String {
        var parts: [String] = []
        if s.txFrames > 0 || !rx { parts.append("tx \(format(s.txMpps, 3)) Mpps \(format(s.txGbps, 3)) Gbit/s") }
        if s.rxFrames > 0 || rx || both { parts.append("rx \(format(s.rxMpps, 3)) Mpps \(format(s.rxGbps, 3)) Gbit/s") }
        return prefix + "\(format(s.seconds, 2)) s: " + parts.joined(separator: ", ")
    }
}
