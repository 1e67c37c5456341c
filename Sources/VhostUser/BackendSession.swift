import SharedMemory

/// One connection of the back-end: reads each message within its deadline, has
/// `RequestDispatcher` carry it out on the handler, and sends what comes back within a
/// deadline (R5). Lives on the control thread only.
final class BackendSession {
    unowned let backend: Backend
    let connection: Int
    /// The framework's handler: torn down with the connection whatever wraps it.
    let deviceHandler: DeviceHandler
    let handler: any VhostUserBackendHandler
    var dispatcher = RequestDispatcher()
    /// Refusals are logged rate-limited: a front-end looping on an invalid message with
    /// NEED_REPLY must not grow the log without bound (R6). `Backend.refusals` counts all.
    var refusalLog = LogThrottle()

    init(backend: Backend, connection: Int) {
        self.backend = backend
        self.connection = connection
        deviceHandler = DeviceHandler(
            device: backend.device, connection: connection, configuration: backend.configuration,
            report: backend.report)
        handler = backend.wrapHandler?(deviceHandler) ?? deviceHandler
    }

    /// Runs the session until the front-end leaves or breaks the protocol. With
    /// `untilDrained` (see `Backend.serveQueued`) it waits for nothing: an empty channel
    /// or `messageLimit` handled messages end it, and a message must already be whole.
    func run(_ channel: MessageChannel, untilDrained: Bool = false, messageLimit: Int = .max) -> VhostUserError? {
        let config = backend.configuration
        let firstMessage = Deadline.after(seconds: config.firstMessageDeadline)
        var spoken = false
        var handled = 0
        while !backend.isStopping && handled < messageLimit {
            do {
                try channel.channel.waitReadable(until: untilDrained ? .now : .after(seconds: config.pollInterval))
                spoken = true
            } catch .timedOut {
                if untilDrained { return nil }
                if !spoken && firstMessage.hasPassed {
                    backend.report(
                        .rejected(
                            connection: connection, request: 0,
                            reason: "no message within \(config.firstMessageDeadline) s"))
                    return .channel(.timedOut)
                }
                continue
            } catch {
                return .channel(error)
            }
            let message: Message
            do {
                message = try channel.receive(
                    until: untilDrained ? .now : .after(seconds: config.messageDeadline),
                    maxDescriptors: MemoryTable.maximumRegions)
            } catch .channel(.closed) {
                return nil
            } catch {
                reportRefusal(0, error.description)
                return error
            }
            if let error = handle(message, on: channel) { return error }
            handled += 1
        }
        return nil
    }

    /// Handles one message; returns an error when the connection must be dropped.
    func handle(_ message: Message, on channel: MessageChannel) -> VhostUserError? {
        let code = message.header.request
        backend.report(
            .message(
                connection: connection, request: code, size: message.header.size,
                descriptors: message.descriptors.count))
        switch dispatcher.dispatch(message, to: handler) {
        case .done:
            return nil
        case .reply(let reply, let request):
            // Hook point: an adversary rewrites, drops or adds to the reply here.
            guard let outgoing = backend.replyHook.map({ $0.willSend(reply, answering: request) }) ?? reply else {
                return nil
            }
            return send(outgoing, channel)
        case .nack(let failure, let why):
            reportRefusal(code, why)
            return send(failure, channel)
        case .drop(let error, let why):
            reportRefusal(code, why)
            return error
        }
    }

    /// Reports a refusal: the first few of a connection, then only the 2^k-th, each with
    /// its running count.
    func reportRefusal(_ request: UInt32, _ reason: String) {
        backend.refusalCount.add(1, ordering: .relaxed)
        guard refusalLog.admit() else { return }
        let n = refusalLog.count
        let suffix = n > LogThrottle.burst ? " (refusal \(n) on this connection; the ones between are not logged)" : ""
        backend.report(.rejected(connection: connection, request: request, reason: reason + suffix))
    }

    /// A front-end that stops reading cannot hold the session past the deadline (R5).
    private func send(_ message: Message, _ channel: MessageChannel) -> VhostUserError? {
        do {
            try channel.send(message, until: .after(seconds: backend.configuration.messageDeadline))
        } catch {
            return error
        }
        return nil
    }

    func tearDown() { deviceHandler.tearDown() }
}
