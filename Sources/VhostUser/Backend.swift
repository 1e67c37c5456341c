public import SharedMemory
import Synchronization
import Virtqueue

/// The vhost-user back-end framework (device side): listens on a Unix socket, serves one
/// front-end at a time, and keeps listening after it leaves or crashes.
///
/// The front-end is not trusted (docs/design.md §1): each connection's session bounds
/// every receive and send by a deadline, `RequestDispatcher` checks each message
/// (size, exact decoding, descriptors) and answers a refusal, and `DeviceHandler` carries
/// out the request (memory table, vrings, queue threads). Device semantics live behind
/// `VhostUserDevice`.
public final class Backend: Sendable {
    /// Limits and timing of the transport.
    public struct Configuration: Sendable {
        /// Time allowed for the rest of a message once its first byte arrived (R5).
        public var messageDeadline: Double = 5
        /// A front-end that connects and says nothing would hold the one serving slot
        /// forever: it is dropped if its first message does not start within this (R5).
        public var firstMessageDeadline: Double = 10
        /// How often the idle loops look at the stop flag.
        public var pollInterval: Double = 0.2
        /// Largest ring accepted (SET_VRING_NUM).
        public var maximumQueueSize: Int = SplitLayout.maximumQueueSize
        /// Spin, block and idle timing of the queue threads.
        public var queueTiming = QueueTiming()

        /// The defaults.
        public init() {}
    }

    /// The device served.
    public let device: any VhostUserDevice
    /// The transport settings.
    public let configuration: Configuration
    let report: @Sendable (BackendEvent) -> Void
    let replyHook: (any ControlReplyHook)?
    let wrapHandler: (@Sendable (DeviceHandler) -> any VhostUserBackendHandler)?
    private let stopping = Atomic<Bool>(false)
    private let connections = Atomic<Int>(0)
    let refusalCount = Atomic<UInt64>(0)

    /// Control messages refused so far, over all connections (logged rate-limited).
    public var refusals: UInt64 { refusalCount.load(ordering: .relaxed) }

    /// A back-end serving `device`.
    ///
    /// - Parameters:
    ///   - device: the device class: features, config space, queue handlers.
    ///   - configuration: limits and timing of the transport (queue size, threads, deadlines).
    ///   - replyHook: lets an adversary tamper with control replies; nil in production.
    ///   - handler: wraps the framework's handler of each connection to change what the
    ///     back-end does at the protocol level (a misbehaving test peer); nil in production.
    ///   - onEvent: called (from any thread) for connections, refusals and queue failures.
    public init(
        device: any VhostUserDevice, configuration: Configuration = Configuration(),
        replyHook: (any ControlReplyHook)? = nil,
        handler: (@Sendable (DeviceHandler) -> any VhostUserBackendHandler)? = nil,
        onEvent: @escaping @Sendable (BackendEvent) -> Void = { _ in }
    ) {
        self.device = device
        self.configuration = configuration
        self.replyHook = replyHook
        self.wrapHandler = handler
        self.report = onEvent
    }

    /// Asks `run` and `serve` to return (within `pollInterval`).
    public func stop() { stopping.store(true, ordering: .releasing) }

    /// True once `stop()` was called.
    public var isStopping: Bool { stopping.load(ordering: .acquiring) }

    /// Listens at `socketPath` and serves front-ends one after another until `stop()`.
    /// The socket file is removed on return.
    public func run(socketPath: String) throws(UnixChannel.Error) {
        let listener = try UnixListener(path: socketPath)
        try run(listener: listener)
    }

    /// The same on a listener the caller created (so a test knows it is listening).
    public func run(listener: UnixListener) throws(UnixChannel.Error) {
        report(.listening(path: listener.path))
        while !isStopping {
            let channel: UnixChannel
            do {
                channel = try listener.accept(until: .after(seconds: configuration.pollInterval))
            } catch .timedOut {
                continue
            }
            _ = serve(channel)
        }
    }

    /// Serves one connected front-end until it leaves, breaks the protocol, or `stop()`.
    /// Returns why the connection ended (nil for an orderly close or a stop).
    @discardableResult
    public func serve(_ channel: UnixChannel) -> VhostUserError? {
        let number = connections.add(1, ordering: .relaxed).newValue
        report(.connected(connection: number))
        let session = BackendSession(backend: self, connection: number)
        // Every send and receive on the channel is non-blocking per call (MSG_DONTWAIT,
        // then poll with the deadline): a front-end that stops reading, or never finishes
        // a message, cannot block the session past a deadline (R5), whatever the
        // socket's own mode, so it is left as accepted (two fcntl calls fewer).
        let reason = session.run(MessageChannel(channel))
        session.tearDown()
        channel.shutdown()
        report(.disconnected(connection: number, reason: reason))
        return reason
    }

    /// Serves the messages already queued on `channel` as one session, then returns as
    /// if the front-end had closed, leaving the channel open. The fuzzer runs one session
    /// per input this way over a single connection (a socket pair per input cost more
    /// than the session itself). Every check is `serve`'s; only the ends differ: a
    /// channel with nothing left to read, or `messageLimit` messages handled, ends the
    /// session (nil; what is left stays queued), and a message cut short times out at
    /// once instead of after `messageDeadline`.
    package func serveQueued(_ channel: UnixChannel, messageLimit: Int = .max) -> VhostUserError? {
        let number = connections.add(1, ordering: .relaxed).newValue
        report(.connected(connection: number))
        let session = BackendSession(backend: self, connection: number)
        let reason = session.run(MessageChannel(channel), untilDrained: true, messageLimit: messageLimit)
        session.tearDown()
        report(.disconnected(connection: number, reason: reason))
        return reason
    }
}
