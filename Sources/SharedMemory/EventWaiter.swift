#if canImport(Glibc)
import Glibc
#endif

/// The one blocking wait of the package: a notifier (kick, call, event channel) and at
/// most one other descriptor (a control socket, a private wake fd), until a deadline.
/// Every queue thread and driver blocks here (R5: always a deadline; EINTR resumes with
/// the same one; no allocation). What it wakes to is the notifier's *state*, which the
/// peer controls: a readable notifier is drained without blocking (`Notifier.drain`), and
/// the caller decides from its ring whether the wake-up was productive (`WakeBackoff`).
public enum EventWaiter {
    public enum Outcome: Equatable, Sendable {
        /// The notifier was readable and has been drained (`count` may be 0: the peer
        /// emptied it first).
        case notified(count: UInt64)
        /// The other descriptor is readable or hung up (checked first: a closed control
        /// socket or a stop request outranks a doorbell).
        case other
        case timedOut
    }

    @inline(__always)
    public static func wait(for notifier: Notifier?, orReadable other: Int32 = -1, until deadline: Deadline)
        -> Outcome
    {
        var fds = (
            pollfd(fd: other, events: Int16(POLLIN), revents: 0),
            pollfd(fd: notifier?.fileDescriptor ?? -1, events: Int16(POLLIN), revents: 0)
        )
        while true {
            let r = withUnsafeMutableBytes(of: &fds) { raw in
                poll(raw.baseAddress?.assumingMemoryBound(to: pollfd.self), 2, deadline.pollTimeoutMilliseconds)
            }
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return .timedOut }
            if fds.0.revents != 0 { return .other }
            guard let notifier else { return .timedOut }
            return .notified(count: notifier.drain())
        }
    }
}

extension EventWaiter {
    /// What `wait(for:orReadable:orWoken:until:)` woke to.
    package enum WakeOutcome: Equatable, Sendable {
        case notified(count: UInt64)
        case other
        /// The private wake eventfd was signalled (and has been drained).
        case woken
        case timedOut
    }

    /// `wait(for:orReadable:until:)` plus a private wake eventfd (an async engine's: new
    /// work arrived). The other descriptor outranks the wake, the wake the notifier.
    package static func wait(
        for notifier: Notifier, orReadable other: Int32 = -1, orWoken wake: Notifier, until deadline: Deadline
    ) -> WakeOutcome {
        var fds = (
            pollfd(fd: other, events: Int16(POLLIN), revents: 0),
            pollfd(fd: wake.fileDescriptor, events: Int16(POLLIN), revents: 0),
            pollfd(fd: notifier.fileDescriptor, events: Int16(POLLIN), revents: 0)
        )
        while true {
            let r = withUnsafeMutableBytes(of: &fds) { raw in
                poll(raw.baseAddress?.assumingMemoryBound(to: pollfd.self), 3, deadline.pollTimeoutMilliseconds)
            }
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return .timedOut }
            if fds.0.revents != 0 { return .other }
            if fds.1.revents != 0 {
                wake.drain()
                return .woken
            }
            return .notified(count: notifier.drain())
        }
    }
}
