import Adversary
import ArgumentParser
import Logging
import SharedMemory
import VhostUser
import VirtioFS

#if canImport(Glibc)
import Glibc
#endif

/// `ringfence serve-fs`: serve a directory as a hardened vhost-user-fs device (a thin
/// shell over `VhostUser.Backend` + `VirtioFSDevice`).
struct ServeFsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-fs",
        abstract: "Serve a directory as a hardened vhost-user-fs (virtio-fs) device.",
        discussion: helpDiscussion(
            "Listens on --socket and serves one front-end (QEMU's vhost-user-fs-pci, or `ringfence fs`) at a time, until SIGINT or SIGTERM; the socket is removed on exit. Nothing the driver sends reaches outside --dir.",
            examples: "ringfence serve-fs --socket fs.sock --dir shared",
            "ringfence serve-fs --socket fs.sock --dir shared --readonly --tag docs"))

    @Option(help: "Unix socket path to listen on.")
    var socket: String

    @Option(help: "Directory to serve.")
    var dir: String

    @Flag(help: "Refuse every change (EROFS).")
    var readonly = false

    @Option(help: "Number of request queues (1...63; the hiprio queue is extra).")
    var queues = 1

    @Option(help: "Mount tag in config space (1...36 bytes).")
    var tag = "ringfence"

    @Option(name: .customLong("max-inodes"), help: "Inodes a driver may hold before LOOKUP answers ENFILE.")
    var maxInodes = 16384

    @OptionGroup var metricsOptions: MetricsOptions

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    @OptionGroup var wait: WaitOptions

    @Option(help: "Misbehave: one attack of the fs catalogue (`ringfence audit --device fs --list`).")
    var attack: String?

    /// The device's options from the command line, validated in `validate()` (exit 2).
    private var deviceOptions: VirtioFSDeviceOptions {
        var options = VirtioFSDeviceOptions(directory: dir)
        options.readOnly = readonly
        options.requestQueues = queues
        options.tag = tag
        options.maximumInodes = maxInodes
        return options
    }

    func validate() throws {
        if let problem = deviceOptions.validate() { throw ValidationError(problem) }
        if let attack, FSCatalogue.attack(named: attack) == nil {
            throw ValidationError("unknown fs attack '\(attack)'; `ringfence audit --device fs --list` shows them")
        }
    }

    func run() throws { try orExitServing("serve-fs") { try serve() } }

    private func serve() throws {
        var logger = Logger(label: "ringfence.serve-fs")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let options = deviceOptions
        // Every inode is an O_PATH descriptor: allow as many as the hard limit permits.
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }

        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        sigaddset(&signals, SIGUSR1)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let served = LateBound<VirtioFSDevice>()
        let serverMetrics = ServerMetrics(
            server: "serve-fs", zeros: ServerMetrics.fsCounters,
            sources: [{ served.current.map { CounterValues($0.statistics) } ?? [:] }])
        let endpoint = try metricsOptions.start(serverMetrics) { logger.notice("\($0)") }
        defer { endpoint?.removeSocket() }

        let log = logger
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
        let device = try VirtioFSDevice(options: options, onEvent: onEvent)
        served.set(device)
        // With --attack: the same device, misbehaving through the hooks.
        let serving: any VhostUserDevice =
            attack.flatMap(FSCatalogue.attack(named:)).map { FSAdversaryDevice(inner: device, attack: $0) } ?? device
        if let attack { logger.notice("attack \(attack)") }
        var configuration = Backend.Configuration()
        configuration.queueTiming.wait = wait.strategy
        let backend = Backend(device: serving, configuration: configuration, onEvent: onEvent)
        logger.info("serving \(dir) as tag \(tag)\(readonly ? " (read-only)" : ""), \(queues) request queue(s)")
        let dumpMetrics: @Sendable () -> Void = { log.notice("metrics (SIGUSR1):\n\(serverMetrics.text)") }
        try startSignalWaiter(signals, onDump: dumpMetrics) { received in
            log.notice("signal \(received): shutting down")
            backend.stop()
        }
        try backend.run(socketPath: socket)
        logger.info("stopped; removed \(socket)")
    }
}
