#if canImport(Glibc)
import Glibc
#endif
internal import CRingFence

/// An eventfd used as a doorbell (kick) or interrupt (call).
///
/// Non-blocking: `signal()` never blocks (EAGAIN means the counter is saturated, i.e. a
/// notification is already pending), `drain()` never blocks, and `wait` always has a
/// deadline (rule R5). Owns its descriptor.
public final class Notifier: @unchecked Sendable {
    public let fileDescriptor: Int32

    /// Creates a new eventfd.
    public init() throws(SystemError) {
        let fd = rf_eventfd(0, RF_EFD_NONBLOCK | RF_EFD_CLOEXEC)
        guard fd >= 0 else { throw .current("eventfd") }
        fileDescriptor = fd
    }

    /// Adopts a descriptor received from a peer; it is made non-blocking because the peer
    /// may have created it blocking, and a blocking read would let it hang us.
    public init(adopting fd: Int32) throws(SystemError) {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else {
            let e = SystemError.current("fcntl(O_NONBLOCK)")
            closeDescriptor(fd)
            throw e
        }
        fileDescriptor = fd
    }

    deinit { closeDescriptor(fileDescriptor) }

    /// Adds one to the counter. Returns false only on an unexpected error.
    @discardableResult
    @inline(__always)
    public func signal() -> Bool {
        var one: UInt64 = 1
        while true {
            let n = write(fileDescriptor, &one, 8)
            if n == 8 { return true }
            if n < 0 && errno == EINTR { continue }
            return n < 0 && errno == EAGAIN  // saturated: already pending
        }
    }

    /// Reads and resets the counter; 0 when nothing was pending.
    @discardableResult
    @inline(__always)
    public func drain() -> UInt64 {
        var value: UInt64 = 0
        while true {
            let n = read(fileDescriptor, &value, 8)
            if n == 8 { return value }
            if n < 0 && errno == EINTR { continue }
            return 0
        }
    }

    /// Blocks until the eventfd is readable or the deadline passes. Returns the drained
    /// count (0 on timeout).
    public func wait(until deadline: Deadline) -> UInt64 {
        while true {
            let got = drain()
            if got > 0 { return got }
            let timeout = deadline.pollTimeoutMilliseconds
            if timeout == 0 { return 0 }
            var pfd = pollfd(fd: fileDescriptor, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, timeout)
            if r < 0 && errno != EINTR { return 0 }
        }
    }
}
