#if canImport(Glibc)
import Glibc
#endif
internal import CRingFence
import Synchronization

/// An eventfd used as a doorbell (kick) or interrupt (call).
///
/// A peer that received the descriptor over SCM_RIGHTS shares its open file description:
/// it can clear `O_NONBLOCK` at any moment and saturate or empty the counter. So nothing
/// here depends on the descriptor's flags (R5, docs/design.md "Descriptors a peer shares"):
/// - `drain()` reads with `RWF_NOWAIT`, which never blocks whatever the flags;
/// - `signal()` writes, and a write can only block on a saturated counter: the
///   `NotifierWatchdog` notices a write that has not returned for a tick, drains the
///   counter (which is what lets a blocked eventfd write finish), and the notifier then
///   reports the peer's tampering (`signal()` returns false, `wasTampered` is set);
/// - `wait` polls (poll ignores the flags) and drains.
/// Owns its descriptor.
public final class Notifier: @unchecked Sendable {
    public let fileDescriptor: Int32
    /// Odd while `signal()` is inside write(2); the watchdog compares two ticks.
    let writes = Atomic<UInt64>(0)
    /// How often the watchdog had to drain the counter to free a blocked write.
    let rescues = Atomic<UInt64>(0)
    /// The watchdog's last look at `writes` (watchdog thread only).
    nonisolated(unsafe) var lastSeenWrite: UInt64 = 0

    /// Creates a new eventfd.
    public init() throws(SystemError) {
        let fd = rf_eventfd(0, RF_EFD_NONBLOCK | RF_EFD_CLOEXEC)
        guard fd >= 0 else { throw .current("eventfd") }
        fileDescriptor = fd
        NotifierWatchdog.shared.register(self)
    }

    /// Adopts a descriptor received from a peer after checking that it is an eventfd
    /// (R3: a pipe could raise SIGPIPE, a memfd or file is always readable).
    public init(adopting descriptor: consuming OwnedDescriptor) throws(DescriptorKindError) {
        let kind = DescriptorKind.of(descriptor.rawValue)
        guard kind == .eventfd else { throw DescriptorKindError(expected: .eventfd, found: kind) }
        let fd = descriptor.take()
        // Non-blocking for our own use; the peer can undo it, and nothing relies on it.
        let flags = fcntl(fd, F_GETFL)
        if flags >= 0 { _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
        fileDescriptor = fd
        NotifierWatchdog.shared.register(self)
    }

    deinit {
        NotifierWatchdog.shared.unregister(self)
        closeDescriptor(fileDescriptor)
    }

    /// The peer made a write of ours block (it cleared O_NONBLOCK and saturated the
    /// counter); the watchdog had to free it. Treat the peer as broken (R6).
    public var wasTampered: Bool { rescues.load(ordering: .relaxed) != 0 }

    /// Adds one to the counter. Returns false when the peer tampered with the descriptor
    /// (see `wasTampered`) or on an unexpected error. A saturated counter on a
    /// non-blocking descriptor means a notification is already pending: true.
    @discardableResult
    @inline(__always)
    public func signal() -> Bool {
        var one: UInt64 = 1
        writes.wrappingAdd(1, ordering: .relaxed)
        var n: Int
        repeat { n = write(fileDescriptor, &one, 8) } while n < 0 && errno == EINTR
        let error = n < 0 ? errno : 0
        writes.wrappingAdd(1, ordering: .relaxed)
        if rescues.load(ordering: .relaxed) != 0 { return false }
        return n == 8 || error == EAGAIN
    }

    /// Reads and resets the counter; 0 when nothing was pending. Never blocks.
    @discardableResult
    @inline(__always)
    public func drain() -> UInt64 { Self.drain(descriptor: fileDescriptor) }

    /// Reads and resets the counter of any eventfd without blocking, whatever its flags.
    @inline(__always)
    public static func drain(descriptor fd: Int32) -> UInt64 {
        var value: UInt64 = 0
        let n = rf_eventfd_read_nowait(fd, &value)
        if n == 8 { return value }
        if n < 0 && errno == EOPNOTSUPP { return legacyDrain(fd) }
        return 0
    }

    /// Kernels before 5.12 have no RWF_NOWAIT on eventfds: poll first, then read. A peer
    /// that empties the counter between the two can still block this read there.
    private static func legacyDrain(_ fd: Int32) -> UInt64 {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, 0) == 1 else { return 0 }
        var value: UInt64 = 0
        return read(fd, &value, 8) == 8 ? value : 0
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
            // Readable but nothing to drain (the peer emptied it first): go round; the
            // deadline still bounds the loop.
        }
    }

    /// Called by the watchdog each tick: a write that was in progress at the last tick and
    /// still is has blocked (no eventfd write takes a tick otherwise). Draining the counter
    /// is what lets it finish.
    func watchdogTick() {
        let now = writes.load(ordering: .relaxed)
        defer { lastSeenWrite = now }
        guard now & 1 == 1, now == lastSeenWrite, Self.writeWouldBlock(fileDescriptor) else { return }
        rescues.wrappingAdd(1, ordering: .relaxed)
        _ = drain()
    }

    /// Whether a write of 1 would block now: the counter is saturated (read from
    /// /proc/self/fdinfo, no I/O on the descriptor). A writer that is merely slow (preempted
    /// on a loaded machine) must not be taken for a blocked one, and a well-behaved peer
    /// never saturates the counter. The flags are not consulted: a peer can set O_NONBLOCK
    /// again once our write blocked, which does not wake it. Without /proc: assume it would.
    static func writeWouldBlock(_ fd: Int32) -> Bool {
        let info = open("/proc/self/fdinfo/\(fd)", O_RDONLY | O_CLOEXEC)
        guard info >= 0 else { return true }
        defer { close(info) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { read(info, $0.baseAddress, $0.count) }
        guard n > 0 else { return true }
        var count: UInt64?
        for line in buffer[..<n].split(separator: UInt8(ascii: "\n")) {
            let text = String(decoding: line, as: UTF8.self)
            let parts = text.split(separator: ":", maxSplits: 1)
            guard parts.count == 2 else { continue }
            let value = parts[1].trimmingCharacters(in: " \t")
            if parts[0] == "eventfd-count" { count = UInt64(value, radix: 16) }
        }
        guard let count else { return true }
        return count >= 0xFFFF_FFFF_FFFF_FFFE
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> Substring {
        var s = self
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return s
    }
}

/// One thread per process that frees `signal()` calls blocked by a peer (see `Notifier`).
/// It looks every `tick` while notifiers exist and sleeps while none do; its work per
/// tick is one atomic load per notifier.
final class NotifierWatchdog: @unchecked Sendable {
    static let shared = NotifierWatchdog()
    /// A blocked write is freed within two ticks.
    static let tickNanoseconds: UInt64 = 20_000_000

    private struct Entry {
        weak var notifier: Notifier?
    }
    private let members = Mutex<[ObjectIdentifier: Entry]>([:])
    private let started = Atomic<Bool>(false)

    func register(_ notifier: Notifier) {
        members.withLock { $0[ObjectIdentifier(notifier)] = Entry(notifier: notifier) }
        if !started.load(ordering: .acquiring),
            started.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        {
            // Without the thread, blocked writes are not freed; everything else still works.
            if let thread = try? spawnThread({ [self] in run() }) {
                thread.detach()
            } else {
                started.store(false, ordering: .releasing)
            }
        }
    }

    func unregister(_ notifier: Notifier) {
        _ = members.withLock { $0.removeValue(forKey: ObjectIdentifier(notifier)) }
    }

    private func run() {
        var snapshot: [Notifier] = []
        while true {
            sleepNanoseconds(Self.tickNanoseconds)
            snapshot.removeAll(keepingCapacity: true)
            members.withLock { m in
                for entry in m.values { if let n = entry.notifier { snapshot.append(n) } }
            }
            for n in snapshot { n.watchdogTick() }
            snapshot.removeAll(keepingCapacity: true)
        }
    }
}

/// The one back-off policy for wake-ups that bring no work (R5): after `threshold`
/// spurious wake-ups in a row, each further one is followed by a pause that doubles from
/// `firstPause` up to `maximumPause` (XSA-391's "lateeoi" throttling), so a storm costs the
/// peer time instead of costing us a CPU. A productive wake-up resets it.
public struct WakeBackoff: Sendable {
    public static let threshold: UInt64 = 16
    public static let firstPauseNanoseconds: UInt64 = 50_000
    public static let maximumPauseNanoseconds: UInt64 = 10_000_000

    /// Spurious wake-ups seen in all.
    public private(set) var spuriousTotal: UInt64 = 0
    /// Spurious wake-ups since the last productive one.
    public private(set) var consecutive: UInt64 = 0
    /// The pause before the next wait (0 while wake-ups bring work).
    public private(set) var pauseNanoseconds: UInt64 = 0
    /// The longest pause applied so far (observability for storms).
    public private(set) var longestPauseNanoseconds: UInt64 = 0

    public init() {}

    /// Records whether the last wake-up found work.
    @inline(__always)
    public mutating func note(productive: Bool) {
        if productive {
            if consecutive != 0 {
                consecutive = 0
                pauseNanoseconds = 0
            }
            return
        }
        spuriousTotal &+= 1
        consecutive &+= 1
        if consecutive > Self.threshold {
            pauseNanoseconds = min(max(pauseNanoseconds &* 2, Self.firstPauseNanoseconds), Self.maximumPauseNanoseconds)
            longestPauseNanoseconds = max(longestPauseNanoseconds, pauseNanoseconds)
        }
    }

    /// The most wake-ups without work the policy lets through in `seconds`: `threshold`
    /// free ones, the doubling pauses up to the maximum, then one per maximum pause. What a
    /// storm can cost, as a bound tests and monitors can check.
    public static func mostSpuriousWakeUps(in seconds: Double) -> Int {
        var pause = firstPauseNanoseconds
        var ramp = 1
        while pause < maximumPauseNanoseconds {
            pause *= 2
            ramp += 1
        }
        return Int(threshold) + ramp + Int(max(0, seconds) * 1e9 / Double(maximumPauseNanoseconds)) + 1
    }

    /// Sleeps for the current pause, but not past `deadline`.
    public func pause(until deadline: Deadline = .distantFuture) {
        guard pauseNanoseconds > 0 else { return }
        let now = monotonicNanoseconds()
        guard deadline.uptimeNanoseconds > now else { return }
        sleepNanoseconds(min(pauseNanoseconds, deadline.uptimeNanoseconds - now))
    }
}

/// The one log rate limit for what a peer can repeat at will (refused control messages,
/// rejected chains): the first `burst` events are logged, then only the 2^k-th, so a peer
/// looping on garbage grows the log by O(log n) lines while `count` still says how many.
public struct LogThrottle: Sendable {
    public static let burst: UInt64 = 8
    public private(set) var count: UInt64 = 0

    public init() {}

    /// Counts one event; true when this one should be logged.
    @inline(__always)
    public mutating func admit() -> Bool {
        count &+= 1
        return count <= Self.burst || count & (count &- 1) == 0
    }
}
