import Foundation
public import SharedMemory
public import VhostUser
import VirtioBlock

/// Serves an `AdversaryDevice` through the real `Backend`, one front-end at a time. Only
/// the accept loop is its own: each connection gets a closer (for `close-mid-io`).
public final class AdversaryServer: Sendable {
    /// The attacked device.
    public let device: AdversaryDevice
    /// The real back-end serving it.
    public let backend: Backend

    /// A server for `device` (short ticks by default, so timer-driven attacks act quickly).
    public init(
        device: AdversaryDevice, configuration: Backend.Configuration = AdversaryServer.configuration,
        onEvent: @escaping @Sendable (BackendEvent) -> Void = { _ in }
    ) {
        self.device = device
        self.backend = Backend(device: device, configuration: configuration, replyHook: device, onEvent: onEvent)
    }

    /// Short ticks: the timer hook (late completions, dumps) runs often enough for a test.
    public static var configuration: Backend.Configuration {
        var c = Backend.Configuration()
        c.pollInterval = 0.05
        c.queueTiming.idleTick = 0.1
        return c
    }

    /// Serves until `stop()`. The listener's socket file is removed on return.
    public func run(listener: UnixListener) {
        while !backend.isStopping {
            guard let channel = try? listener.accept(until: .after(seconds: backend.configuration.pollInterval)) else {
                continue
            }
            device.setConnectionCloser { channel.shutdown() }
            backend.serve(channel)
            device.setConnectionCloser(nil)
        }
    }

    /// Starts `run` on a thread of its own; returns once the socket is listening.
    public func start(socketPath: String) throws(UnixChannel.Error) {
        let listener = try UnixListener(path: socketPath)
        Thread.detachNewThread { [self] in run(listener: listener) }
    }

    /// Stops serving; `run(listener:)` returns.
    public func stop() {
        device.release()
        backend.stop()
    }
}
