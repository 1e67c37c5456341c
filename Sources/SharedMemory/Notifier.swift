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
    // @unchecked Sendable: an immutable descriptor (eventfd operations are thread-safe in
    // the kernel) and atomic counters.
    public let fileDescriptor: Int32
    /// Odd while `signal()` is inside write(2); the watchdog compares two ticks.
    let writes = Atomic<UInt64>(0)
    /// How often the watchdog had to drain the counter to free a blocked write.
    let rescues = Atomic<UInt64>(0)
    /// The watchdog's last look at `writes` (watchdog thread only).
    nonisolated(unsafe) var lastSeenWrite: UInt64 = 0
    /// Tells notifiers apart for the watchdog's copies of their descriptors (an object's
    /// address can be reused by the next notifier).
    let serial = Notifier.serials.wrappingAdd(1, ordering: .relaxed).newValue
    static let serials = Atomic<UInt64>(0)

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
    /// `descriptor`: the watchdog's own copy of `fileDescriptor` (the same open file
    /// description; see `NotifierWatchdog`).
    func watchdogTick(descriptor: Int32) {
        let now = writes.load(ordering: .relaxed)
        defer { lastSeenWrite = now }
        guard now & 1 == 1, now == lastSeenWrite, Self.writeWouldBlock(descriptor) else { return }
        rescues.wrappingAdd(1, ordering: .relaxed)
        _ = Self.drain(descriptor: descriptor)
    }

    /// Whether a write of 1 would block now: the counter is saturated (read from
    /// /proc/self/fdinfo, no I/O on the descriptor). A writer that is merely slow (preempted
    /// on a loaded machine) must not be taken for a blocked one, and a well-behaved peer
    /// never saturates the counter. The flags are not consulted: a peer can set O_NONBLOCK
    /// again once our write blocked, which does not wake it. Without /proc: assume it would.
    static func writeWouldBlock(_ fd: Int32) -> Bool {
        let info = open("/proc/thread-self/fdinfo/\(fd)", O_RDONLY | O_CLOEXEC)
        guard info >= 0 else { return true }
        defer { close(info) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { read(info, $0.baseAddress, $0.count) }
        guard n > 0 else { return true }
        var count: UInt64?
        for line in buffer[..<n].split(separator: UInt8(ascii: "\n")) {
            // "eventfd-count:   fffffffffffffffe" (hex, Linux's eventfd_show_fdinfo)
            let fields = String(decoding: line, as: UTF8.self).split(whereSeparator: \.isWhitespace)
            if fields.count == 2 && fields[0] == "eventfd-count:" { count = UInt64(fields[1], radix: 16) }
        }
        guard let count else { return true }
        return count >= 0xFFFF_FFFF_FFFF_FFFE
    }
}

/// One thread per process that frees `signal()` calls blocked by a peer (see `Notifier`).
/// Started with the first notifier; it looks every `tick`, and its work per tick is one
/// atomic load per notifier (fdinfo is read only for a write seen in progress twice).
///
/// The thread keeps a descriptor table of its own (`unshare(CLONE_FILES)`) holding copies
/// of the notifiers' descriptors (`pidfd_getfd`, fetched at its first tick after a notifier
/// registers, closed at the first tick after it is gone). A thread that shared the
/// process's table would make every system call on a descriptor in the process take and
/// drop a reference on its file (the kernel skips that only while one thread uses the
/// table): about 40 ns more per kick's eventfd write on the driver's CPU, measured
/// (docs/benchmarks.md, issue 19 session 6), on a line the peer's CPU touches too. Where
/// the kernel refuses either call, the thread shares the table and uses the descriptors
/// as they are, as before.
final class NotifierWatchdog: @unchecked Sendable {
    // @unchecked Sendable: its members are in a Mutex, `started` and `ownTable` are
    // atomic; `copies` belongs to the watchdog thread.
    static let shared = NotifierWatchdog()
    /// A blocked write is freed within two ticks.
    static let tickNanoseconds: UInt64 = 20_000_000

    private struct Entry {
        weak var notifier: Notifier?
    }
    private let members = Locked<[ObjectIdentifier: Entry]>([:])
    private let started = Atomic<Bool>(false)
    /// Whether the thread runs on a descriptor table of its own (tests read it).
    let ownTable = Atomic<Bool>(false)
    /// The watchdog thread's id once it runs (tests read it), else 0.
    let threadID = Atomic<Int32>(0)

    func register(_ notifier: Notifier) {
        members.withLock { $0[ObjectIdentifier(notifier)] = Entry(notifier: notifier) }
        if !started.load(ordering: .acquiring),
            started.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        {
            // Without the thread, blocked writes are not freed; everything else still works.
            #if RINGFENCE_SPLIT_PROBE
            if getenv("RINGFENCE_NO_WATCHDOG") != nil { return }
            #endif
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

    /// Moves the thread to a descriptor table of its own, if the kernel can also copy the
    /// notifiers' descriptors into it; returns the pidfd to copy them through, or -1
    /// (the table stays shared).
    private func leaveSharedTable() -> Int32 {
        // Probe both calls in the shared table first: once unshared, the thread could not
        // go back if pidfd_getfd turned out refused.
        let probe = rf_pidfd_open(getpid())
        guard probe >= 0 else { return -1 }
        let copy = rf_pidfd_getfd(probe, probe)
        closeDescriptor(probe)
        guard copy >= 0 else { return -1 }
        closeDescriptor(copy)
        guard rf_unshare_files() == 0 else { return -1 }
        let pidfd = rf_pidfd_open(getpid())
        if pidfd >= 0 { ownTable.store(true, ordering: .releasing) }
        return pidfd
    }

    private func run() {
        threadID.store(rf_gettid(), ordering: .releasing)
        let pidfd = leaveSharedTable()
        // The thread's copies by notifier serial (own table only).
        var copies: [UInt64: Int32] = [:]
        var snapshot: [Notifier] = []
        var live = Set<UInt64>()
        while true {
            sleepNanoseconds(Self.tickNanoseconds)
            snapshot.removeAll(keepingCapacity: true)
            members.withLock { m in
                for entry in m.values { if let n = entry.notifier { snapshot.append(n) } }
            }
            if pidfd < 0 {
                for n in snapshot { n.watchdogTick(descriptor: n.fileDescriptor) }
                snapshot.removeAll(keepingCapacity: true)
                continue
            }
            live.removeAll(keepingCapacity: true)
            for n in snapshot {
                live.insert(n.serial)
                // The snapshot holds the notifier, so its descriptor is still open.
                var copy = copies[n.serial] ?? -1
                if copy < 0 {
                    copy = rf_pidfd_getfd(pidfd, n.fileDescriptor)
                    if copy < 0 { continue }  // out of descriptors: tried again next tick
                    copies[n.serial] = copy
                }
                n.watchdogTick(descriptor: copy)
            }
            snapshot.removeAll(keepingCapacity: true)
            if copies.count > live.count {
                for (serial, copy) in copies where !live.contains(serial) {
                    closeDescriptor(copy)
                    copies[serial] = nil
                }
            }
        }
    }
}
