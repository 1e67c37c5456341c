import ArgumentParser
import Logging
import SharedMemory
import VhostUser
import VirtioNet

#if canImport(Glibc)
import Glibc
#endif

/// `ringfence serve-net`: hardened vhost-user-net devices on one fabric (a thin shell over
/// `VhostUser.Backend` + `VirtioNetDevice` + `NetFabric`).
struct ServeNetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-net",
        abstract: "Serve hardened vhost-user-net devices: a learning switch, a loopback or a sink.",
        discussion: helpDiscussion(
            "One device per --socket, each serving one front-end (QEMU, DPDK's virtio_user, `ringfence net`) at a time, until SIGINT or SIGTERM; the sockets are removed on exit. --switch forwards between the front-ends of every socket (an L2 learning switch), --loopback returns each frame to its sender, --sink counts and drops.",
            examples: "ringfence serve-net --socket net.sock --loopback",
            "ringfence serve-net --socket a.sock --socket b.sock --switch",
            "ringfence serve-net --socket net.sock --sink --queue-pairs 2"))

    @Option(help: "Unix socket path to listen on (repeat for more ports).")
    var socket: [String]

    @Flag(help: "An L2 learning switch between every socket's front-end.")
    var `switch` = false

    @Flag(help: "Return every frame to its sender.")
    var loopback = false

    @Flag(help: "Count and drop every frame.")
    var sink = false

    @Option(help: "With --switch: also switch to and from this Linux TAP interface (created if missing).")
    var tap: String?

    @Option(help: "MAC address of the device (one socket only; default: random, locally administered).")
    var mac: String?

    @Option(help: "MTU announced (VIRTIO_NET_F_MTU), 68...65517.")
    var mtu = 1500

    @Option(name: .customLong("queue-pairs"), help: "Queue pairs per device (MQ when > 1).")
    var queuePairs = 1

    @Option(name: .customLong("queue-size"), help: "Largest ring the driver may use (power of two).")
    var queueSize = 1024

    @Flag(name: .customLong("no-packed"), help: "Do not offer packed virtqueues.")
    var noPacked = false

    @Flag(name: .customLong("no-mergeable"), help: "Do not offer VIRTIO_NET_F_MRG_RXBUF.")
    var noMergeable = false

    @Flag(name: .customLong("no-ctrl"), help: "Do not offer a control queue.")
    var noCtrl = false

    @Flag(name: .customLong("no-in-order"), help: "Do not offer VIRTIO_F_IN_ORDER.")
    var noInOrder = false

    @OptionGroup var metricsOptions: MetricsOptions

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    var mode: NetFabricMode { loopback ? .loopback : sink ? .sink : .switch }

    /// The device's options from the command line, validated in `validate()` (exit 2).
    private var deviceOptions: VirtioNetDeviceOptions {
        var options = VirtioNetDeviceOptions()
        options.mac = mac.flatMap(parseMAC)
        options.mtu = mtu
        options.queuePairs = queuePairs
        options.queueSize = queueSize
        options.packedRing = !noPacked
        options.mergeableRxBuffers = !noMergeable
        options.controlQueue = !noCtrl
        options.inOrder = !noInOrder
        return options
    }

    func validate() throws {
        guard !socket.isEmpty else { throw ValidationError("at least one --socket") }
        guard [`switch`, loopback, sink].filter({ $0 }).count == 1 else {
            throw ValidationError("exactly one of --switch, --loopback, --sink")
        }
        if tap != nil && !`switch` { throw ValidationError("--tap needs --switch") }
        if mac != nil && socket.count > 1 { throw ValidationError("--mac needs a single --socket") }
        if let mac, parseMAC(mac) == nil { throw ValidationError("--mac \(mac) is not aa:bb:cc:dd:ee:ff") }
        if let problem = deviceOptions.validate() { throw ValidationError(problem) }
    }

    /// The TAP could not be opened or created (no CAP_NET_ADMIN, a bad name): exit 1.
    struct TapFailed: Error, CustomStringConvertible {
        let name: String
        let error: any Error
        var description: String { "--tap \(name): \(error)" }
    }

    func run() throws { try orExitServing("serve-net") { try serve() } }

    private func serve() throws {
        var logger = Logger(label: "ringfence.serve-net")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let options = deviceOptions

        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGUSR1)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        // One port of the metrics per socket, each reading its device's counters.
        let devices = socket.map { _ in LateBound<VirtioNetDevice>() }
        let serverMetrics = ServerMetrics(
            server: "serve-net", zeros: ServerMetrics.netCounters,
            sources: devices.map { d in { d.current?.counterValues ?? [:] } })
        let endpoint = try metricsOptions.start(serverMetrics) { logger.notice("\($0)") }
        defer { endpoint?.removeSocket() }

        let log = logger
        let onEvent: @Sendable (BackendEvent, Int) -> Void = { event, port in
            serverMetrics.record(event, port: port)
            switch event {
            case .queueFailed, .queueNotRestarted, .rejected, .requestRejected:
                log.warning("\(event)")
            case .disconnected(_, let reason) where reason != nil:
                log.warning("\(event)")
            case .message:
                log.trace("\(event)")
            case .queueStarted, .queueStopped:
                log.debug("\(event)")
            default:
                log.info("\(event)")
            }
        }
        let fabric = NetFabric(mode: mode)
        var configuration = Backend.Configuration()
        configuration.maximumQueueSize = queueSize
        var backends: [Backend] = []
        var listeners: [UnixListener] = []
        for (port, path) in socket.enumerated() {
            let portEvent: @Sendable (BackendEvent) -> Void = { onEvent($0, port) }
            let device = VirtioNetDevice(fabric: fabric, options: options, onEvent: portEvent)
            devices[port].set(device)
            backends.append(Backend(device: device, configuration: configuration, onEvent: portEvent))
            listeners.append(try UnixListener(path: path))
            logger.info("\(path): port with MAC \(formatMAC(device.mac)), MTU \(mtu), \(queuePairs) queue pair(s)")
        }
        var tapPort: NetTap?
        if let tap {
            do {
                tapPort = try NetTap(name: tap, fabric: fabric, mtu: mtu)
            } catch {
                throw TapFailed(name: tap, error: error)
            }
            logger.info("TAP \(tap) is a port of the switch")
        }
        logger.info("\(mode.rawValue) of \(socket.count) port(s)\(tap == nil ? "" : " and a TAP")")
        let all = backends
        let dumpMetrics: @Sendable () -> Void = { log.notice("metrics (SIGUSR1):\n\(serverMetrics.text)") }
        try startSignalWaiter(signals, onDump: dumpMetrics) { received in
            log.notice("signal \(received): shutting down")
            for b in all { b.stop() }
        }
        var threads: [SpawnedThread] = []
        for (backend, listener) in zip(backends.dropFirst(), listeners.dropFirst()) {
            let box = ListenerBox(listener)
            threads.append(try spawnThread { try? backend.run(listener: box.listener) })
        }
        try backends[0].run(listener: listeners[0])
        for t in threads { t.join() }
        tapPort?.stop()
        let s = fabric.statistics
        logger.info(
            "stopped: \(s.framesIn) frames in (\(s.bytesIn) bytes), \(s.framesDelivered) delivered, \(s.framesDropped) dropped, \(s.framesRejected) rejected"
        )
    }
}

/// Hands a listener to a back-end's thread.
private final class ListenerBox: @unchecked Sendable {
    let listener: UnixListener
    init(_ listener: UnixListener) { self.listener = listener }
}
