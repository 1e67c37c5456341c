import Adversary
import ArgumentParser
import BlockImage
import Logging
import SharedMemory
import VhostUser
import VirtioBlock

#if canImport(Glibc)
import Glibc
#endif

/// `ringfence serve-blk`: export a file as a vhost-user-blk device (a thin shell over
/// `VhostUser.Backend` + `VirtioBlockDevice`).
struct ServeBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-blk",
        abstract: "Serve a file as a hardened vhost-user-blk device.",
        discussion: helpDiscussion(
            "Listens on --socket and serves one vhost-user front-end (QEMU, or `ringfence blk`) at a time, until SIGINT or SIGTERM; the socket is removed on exit.",
            examples: "ringfence serve-blk --socket blk.sock --image disk.img",
            "ringfence serve-blk --socket blk.sock --image disk.img --queues 4 --poll",
            "ringfence serve-blk --socket b.sock --image disk.img --metrics 127.0.0.1:9100"))

    @Option(help: "Unix socket path to listen on.")
    var socket: String

    @Option(help: "Disk image file (its size, rounded down to 512 bytes, is the capacity).")
    var image: String

    @Flag(help: "Refuse writes, discards and write-zeroes (VIRTIO_BLK_F_RO).")
    var readonly = false

    @Option(help: "Number of request queues (1...64).")
    var queues = 1

    @Option(name: .customLong("queue-size"), help: "Largest ring the driver may use (power of two).")
    var queueSize = 256

    @Option(name: .customLong("block-size"), help: "Logical block size in bytes (power of two, 512...65536).")
    var blockSize: UInt32 = 512

    @Flag(help: "Open the image with O_DIRECT.")
    var direct = false

    @Flag(name: .customLong("no-packed"), help: "Do not offer packed virtqueues (VIRTIO_F_RING_PACKED).")
    var noPacked = false

    @Option(help: "Serial number returned by GET_ID (up to 20 bytes).")
    var serial = "ringfence"

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    @Option(help: "Misbehave: one attack of the adversary catalogue (`ringfence audit --list`).")
    var attack: String?

    @Option(name: .customLong("attack-after"), help: "Requests served correctly before the attack starts.")
    var attackAfter: Int?

    @Option(help: "leak-probe: write dumps of all shared memory to this file.")
    var dump: String?

    @Option(
        name: .customLong("negotiation-file"),
        help: "With --attack: write the ring format the front-end acked (split or packed) to this file.")
    var negotiationFile: String?

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics at ADDR: a Unix socket path or 127.0.0.1:PORT (SIGUSR1 logs them too).",
            valueName: "addr"))
    var metrics: String?

    @OptionGroup var wait: WaitOptions

    /// The device's options from the command line, validated in `validate()` (exit 2).
    private var deviceOptions: VirtioBlockDeviceOptions {
        var options = VirtioBlockDeviceOptions()
        options.readOnly = readonly
        options.queueCount = queues
        options.queueSize = queueSize
        options.blockSize = blockSize
        options.serial = serial
        options.direct = direct
        options.packedRing = !noPacked
        return options
    }

    func validate() throws {
        if let problem = deviceOptions.validate() { throw ValidationError(problem) }
        if let metrics { _ = try MetricsAddress(parsing: metrics) }
        if let attack, Catalogue.attack(named: attack) == nil {
            throw ValidationError("unknown attack '\(attack)'; `ringfence audit --list` shows the catalogue")
        }
        if let attackAfter, attackAfter < 0 { throw ValidationError("--attack-after must be >= 0") }
    }

    func run() throws { try orExitServing("serve-blk") { try serve() } }

    private func serve() throws {
        var logger = Logger(label: "ringfence.serve-blk")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let options = deviceOptions

        // Block the signals before any thread exists, so every thread inherits the mask and
        // only the waiter below receives them (clean shutdown, socket removed).
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGUSR1)
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        let deviceImage = try DeviceImage(path: image, readOnly: readonly, direct: direct)
        let log = logger
        let counters = BlockDeviceCounters()
        let serverMetrics = ServerMetrics(server: "serve-blk", source: counters)
        let endpoint = try metrics.map { try MetricsEndpoint(try MetricsAddress(parsing: $0), metrics: serverMetrics) }
        defer { endpoint?.removeSocket() }
        if let endpoint { logger.notice("metrics on \(endpoint.bound)") }
        let onEvent: @Sendable (BackendEvent) -> Void = { event in
            serverMetrics.record(event)
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
        let device = VirtioBlockDevice(image: deviceImage, options: options, counters: counters, onEvent: onEvent)
        let dumpMetrics: @Sendable () -> Void = { log.notice("metrics (SIGUSR1):\n\(serverMetrics.text)") }
        var configuration = attack == nil ? Backend.Configuration() : AdversaryServer.configuration
        configuration.maximumQueueSize = queueSize
        configuration.queueTiming.wait = wait.strategy
        if let attack = attack.flatMap(Catalogue.attack(named:)) {
            // The same device and back-end, misbehaving through the hooks.
            let adversary = AdversaryDevice(
                inner: device, attack: attack, after: attackAfter, dumpPath: dump, negotiationPath: negotiationFile)
            let server = AdversaryServer(device: adversary, configuration: configuration, onEvent: onEvent)
            logger.notice(
                "attack \(attack.name) (\(attack.rule.rawValue)) after \(adversary.after) request(s): \(attack.summary)"
            )
            try startSignalWaiter(signals, onDump: dumpMetrics) { received in
                log.notice("signal \(received): shutting down")
                server.stop()
            }
            server.run(listener: try UnixListener(path: socket))
            return
        }
        let backend = Backend(device: device, configuration: configuration, onEvent: onEvent)
        logger.info(
            "serving \(image) (\(deviceImage.size) bytes\(device.readOnly ? ", read-only" : ""), \(queues) queue(s) of up to \(queueSize))"
        )
        // A plain pthread inherits the mask (Foundation's Thread resets it, which let a
        // SIGTERM kill the process by default action before the socket was removed).
        try startSignalWaiter(signals, onDump: dumpMetrics) { received in
            log.notice("signal \(received): shutting down")
            backend.stop()
        }
        try backend.run(socketPath: socket)
        logger.info("stopped; removed \(socket)")
    }
}

/// Waits for one of `signals` (blocked in every thread) on a detached pthread that
/// inherits the caller's mask: SIGUSR1 calls `onDump` and waits on, any other calls
/// `handler` and ends the wait.
func startSignalWaiter(
    _ signals: sigset_t, onDump: @escaping @Sendable () -> Void = {},
    _ handler: @escaping @Sendable (Int32) -> Void
) throws {
    final class Waiter: @unchecked Sendable {
        var signals: sigset_t
        let handler: @Sendable (Int32) -> Void
        let onDump: @Sendable () -> Void
        init(
            _ signals: sigset_t, _ onDump: @escaping @Sendable () -> Void,
            _ handler: @escaping @Sendable (Int32) -> Void
        ) {
            self.signals = signals
            self.handler = handler
            self.onDump = onDump
        }
    }
    let box = Unmanaged.passRetained(Waiter(signals, onDump, handler)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(
        &thread, nil,
        { arg in
            guard let arg else { return nil }
            let waiter = Unmanaged<Waiter>.fromOpaque(arg).takeRetainedValue()
            var received: Int32 = 0
            while true {
                while sigwait(&waiter.signals, &received) != 0 {}
                if received == SIGUSR1 {
                    waiter.onDump()
                    continue
                }
                waiter.handler(received)
                return nil
            }
        }, box)
    guard rc == 0 else {
        Unmanaged<Waiter>.fromOpaque(box).release()
        throw ValidationError("cannot start the signal thread (error \(rc))")
    }
    pthread_detach(thread)
}
