#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory

/// An emulated Xen event channel: one eventfd we wait on, one the peer waits on.
///
/// R5: a wake-up that brings no work is counted as spurious, and after a few in a row
/// the next waits are delayed with exponential backoff (XSA-391's "lateeoi" throttling),
/// so an event storm slows this device down instead of spinning the process. Once the
/// device is disabled the channel is masked: no more sends, no more waits.
public final class EventChannel: @unchecked Sendable {
    public let incoming: Notifier
    public let outgoing: Notifier
    @exclusivity(unchecked) public private(set) var isMasked = false
    @exclusivity(unchecked) public private(set) var spuriousEvents: UInt64 = 0
    @exclusivity(unchecked) public private(set) var consecutiveSpurious: UInt64 = 0
    /// Current backoff before the next wait (0 when events carry work).
    @exclusivity(unchecked) public private(set) var backoffNanoseconds: UInt64 = 0
    /// Largest backoff applied so far (observability for storms).
    @exclusivity(unchecked) public private(set) var longestBackoffNanoseconds: UInt64 = 0
    public static let spuriousThreshold: UInt64 = 4
    public static let maximumBackoffNanoseconds: UInt64 = 10_000_000

    public init(incoming: Notifier, outgoing: Notifier) {
        self.incoming = incoming
        self.outgoing = outgoing
    }

    /// Signals the peer (not once masked).
    public func notify() {
        if !isMasked { outgoing.signal() }
    }

    /// Waits for an event until `deadline` (after any backoff). False on timeout or when
    /// masked.
    public func wait(until deadline: Deadline) -> Bool {
        if isMasked { return false }
        if backoffNanoseconds > 0 {
            var request = timespec(
                tv_sec: Int(backoffNanoseconds / 1_000_000_000), tv_nsec: Int(backoffNanoseconds % 1_000_000_000))
            var remaining = timespec()
            while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
        }
        // poll, then drain: two system calls per sleep (Notifier.wait drains first, which
        // costs a third on this hot path; the caller has just checked the ring anyway).
        while true {
            let timeout = deadline.pollTimeoutMilliseconds
            var pfd = pollfd(fd: incoming.fileDescriptor, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, timeout)
            if r > 0 {
                incoming.drain()
                return true
            }
            if r == 0 || errno != EINTR { return false }
        }
    }

    /// Reports whether the last wake-up found work; drives the spurious-event backoff.
    public func noteWake(productive: Bool) {
        if productive {
            consecutiveSpurious = 0
            backoffNanoseconds = 0
            return
        }
        spuriousEvents &+= 1
        consecutiveSpurious &+= 1
        if consecutiveSpurious > Self.spuriousThreshold {
            backoffNanoseconds = min(max(backoffNanoseconds &* 2, 50_000), Self.maximumBackoffNanoseconds)
            longestBackoffNanoseconds = max(longestBackoffNanoseconds, backoffNanoseconds)
        }
    }

    /// Masks the channel (the device is disabled, R6): pending events are dropped.
    public func mask() {
        isMasked = true
        incoming.drain()
    }
}
