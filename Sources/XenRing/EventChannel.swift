#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory

/// An emulated Xen event channel: one eventfd we wait on, one the peer waits on. Both are
/// shared with the peer, so nothing here depends on their flags or counters (`Notifier`).
///
/// R5: a wake-up that brings no work is counted as spurious and backed off with the
/// shared `WakeBackoff` policy (XSA-391's "lateeoi" throttling), on the frontend and the
/// backend alike, so an event storm slows this device down instead of spinning the
/// process. Once the device is disabled the channel is masked: no more sends, no waits.
public final class EventChannel: @unchecked Sendable {
    // @unchecked Sendable: the notifiers are thread-safe; `isMasked` and `backoff` belong to
    // the device's one driving thread (the frontend's owner, the async engine's I/O thread,
    // or the backend connection's thread), which is the only one that waits or masks.
    /// Events from the peer.
    public let incoming: Notifier
    /// Events to the peer.
    public let outgoing: Notifier
    /// True once the device was disabled: no more sends or waits.
    @exclusivity(unchecked) public private(set) var isMasked = false
    @exclusivity(unchecked) public private(set) var backoff = WakeBackoff()

    /// Events that brought no work.
    public var spuriousEvents: UInt64 { backoff.spuriousTotal }
    /// Current pause before the next wait (0 when events carry work).
    public var backoffNanoseconds: UInt64 { backoff.pauseNanoseconds }
    /// Largest pause applied so far (observability for storms).
    public var longestBackoffNanoseconds: UInt64 { backoff.longestPauseNanoseconds }
    /// Spurious events in a row before the backoff starts.
    public static var spuriousThreshold: UInt64 { WakeBackoff.threshold }

    /// A channel over two eventfds (one each way).
    public init(incoming: Notifier, outgoing: Notifier) {
        self.incoming = incoming
        self.outgoing = outgoing
    }

    /// Signals the peer (not once masked). False when the peer made the send block
    /// (the caller disables the device, R6).
    @discardableResult
    public func notify() -> Bool {
        isMasked || outgoing.signal()
    }

    /// Waits for an event until `deadline` (after any backoff). False on timeout or when
    /// masked.
    public func wait(until deadline: Deadline) -> Bool {
        if isMasked { return false }
        backoff.pause(until: deadline)
        if case .notified = EventWaiter.wait(for: incoming, until: deadline) { return true }
        return false
    }

    /// `wait(until:)` that also returns (false) once `wake` is signalled: an async
    /// engine's thread, woken for new work.
    package func wait(until deadline: Deadline, orWoken wake: Notifier) -> Bool {
        if isMasked { return false }
        backoff.pause(until: deadline)
        if case .notified = EventWaiter.wait(for: incoming, orWoken: wake, until: deadline) { return true }
        return false
    }

    /// Reports whether the last wake-up found work; drives the spurious-event backoff.
    @inline(__always)
    public func noteWake(productive: Bool) {
        backoff.note(productive: productive)
    }

    /// Masks the channel (the device is disabled, R6): pending events are dropped.
    public func mask() {
        isMasked = true
        incoming.drain()
    }
}
