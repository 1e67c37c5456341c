#if canImport(Glibc)
import Glibc
#endif
import Synchronization

// The machinery behind every transport's `async` calls (virtio-blk, Xen blk): one I/O thread
// per engine drives a synchronous queue (submit/poll/wait) and resumes the callers'
// continuations, so no cooperative-pool thread ever blocks on an eventfd or a socket.
// `package`: shared by the device modules, not a public API of its own.

/// What an async request does.
package enum IOKind: Sendable {
    case read, write, flush
    /// The device's identity string into the buffer (virtio-blk GET_ID).
    case identify
}

/// One request as the transport posts it: `buffer` is engine-owned memory that stays
/// allocated until the transport has handed back this piece's completion (reads land in
/// it, writes are copied from it into the transport's bounce memory when posted).
package struct IOPiece {
    package let kind: IOKind
    /// Bytes from the start of the disk.
    package let offset: UInt64
    package let buffer: UnsafeMutableRawBufferPointer
}

/// A synchronous queue an `IOEngine` drives from its thread: the only thread that ever
/// calls these methods while the engine owns the queue.
package protocol IOTransport: AnyObject, SendableMetatype {
    associatedtype Failure: Error & Sendable
    /// Largest piece one request may carry (a multiple of the block size).
    var maxPieceBytes: Int { get }
    /// Posts a piece (unpublished). False: no room now, retry after a completion.
    func post(_ piece: IOPiece, tag: UInt64) throws(Failure) -> Bool
    /// Publishes what was posted (and notifies the device if it wants it).
    func publish()
    /// The next completion, never blocking; after the device broke, each request still in
    /// flight comes back as its failure.
    func nextCompletion() -> (tag: UInt64, failure: Failure?)?
    var inFlight: Int { get }
    /// Blocks until a completion may be ready, `wake` was signalled, or a request deadline
    /// acted (the transport breaks the device then, R5); returning early (nothing done) is
    /// allowed, and a transport that polls instead of blocking must return within a few
    /// milliseconds (the engine's executor runs jobs queued from other threads meanwhile).
    func waitForCompletion(orWake wake: Notifier)
    /// Runs `body` with the queue to itself (a queue shared with synchronous callers takes
    /// their lock). `body` returns only with nothing in flight.
    func exclusively(_ body: () -> Void)
    /// The failure of requests still queued when the engine stops.
    var closedFailure: Failure { get }
    /// The failure of a request that found no room with nothing in flight (it never will).
    var noRoomFailure: Failure { get }
    /// The engine stopped and nothing is in flight: the last call on its thread.
    func engineStopped()
    /// Whether the awaiting callers' own (pool) threads may drive the queue between the
    /// engine thread's turns: post, publish, poll, all non-blocking, one thread at a time
    /// (the engine's drive token orders them), while the engine thread holds
    /// `exclusively`. False (the default): only the engine thread touches the transport.
    var callersMayDrive: Bool { get }
    /// Whether a caller's thread may poll now: false while the transport needs work that
    /// may block (a reconnect under way); the engine thread does that. Default: true.
    var mayPollInline: Bool { get }
    /// How long a caller's thread may poll for a completion before it hands the waiting
    /// to the engine thread (the transport's wait strategy; 0: never). Default: 0.
    var inlineSpinNanoseconds: UInt64 { get }
    /// Acts on request deadlines (R5) without blocking, for drivers that never wait.
    /// Default: nothing (the transport's `waitForCompletion` does it).
    func checkDeadlines()
}

extension IOTransport {
    /// Only the engine thread drives.
    package var callersMayDrive: Bool { false }
    /// Always.
    package var mayPollInline: Bool { true }
    /// Never spin on a caller's thread.
    package var inlineSpinNanoseconds: UInt64 { 0 }
    /// Nothing: `waitForCompletion` acts on deadlines.
    package func checkDeadlines() {}
}

/// Where an operation's outcome goes.
package enum IODelivery<Failure: Error & Sendable>: Sendable {
    /// One awaiting caller.
    case caller
    /// A stream of completions: `sink` gets this operation's, tagged.
    case stream(tag: UInt64, sink: @Sendable (IOCompletion<Failure>) -> Void)
}

/// A completion as a stream delivers it: the caller's tag and the bytes read (empty for
/// writes and flushes), or the failure.
public struct IOCompletion<Failure: Error & Sendable>: Sendable {
    /// The tag the request was posted with.
    public let tag: UInt64
    /// The bytes read (empty for writes and flushes), or the failure.
    public let result: Result<[UInt8], Failure>

    package init(tag: UInt64, result: Result<[UInt8], Failure>) {
        self.tag = tag
        self.result = result
    }
}

/// One async call (cut into pieces by the engine), as the engine sees it: free of the
/// failure type, so the engine's queues, its in-flight table and the continuations are
/// concrete types. (The engine is generic over a transport of another module and runs
/// unspecialized; every generic type it touched per request cost a run-time metadata
/// lookup, about a seventh of the async path's CPU in `perf` at iodepth 32, issue 20.)
/// The buffer is the engine's until every posted piece has completed (or the device was
/// reset): a cancelled caller is resumed at once, but the memory a late completion lands in
/// is never handed to anyone else.
package class IOOperationCore: @unchecked Sendable {
    // @unchecked: `kind`, `offset`, `buffer` are immutable; the `engine...` fields are
    // touched only by the holder of the engine's drive token; `cancelled` and `waiter` are
    // atomic; `continuation` is written before `waiter` becomes `waiting` (releasing) and
    // read only by whoever moves it from `waiting` to `over` (acquiring), once; `readResult`
    // is set in `init` and taken once, by whoever receives the outcome (after that exchange,
    // or on the drive-token holder's thread for a stream).
    /// What the engine hands the awaiting caller: done (the caller copies the bytes out of
    /// `buffer`, which the engine no longer touches), failed, or cancelled.
    enum Outcome: Sendable {
        case done
        case failed(any Error & Sendable)
        case cancelled
    }

    /// `waiter`'s states: no continuation yet; `continuation` installed; cancelled before
    /// the continuation was installed, or resumed.
    static var notInstalled: UInt8 { 0 }
    static var waiting: UInt8 { 1 }
    static var over: UInt8 { 2 }

    let kind: IOKind
    let offset: UInt64
    let buffer: UnsafeMutableRawBufferPointer
    /// Delivered through `deliverToStream` (a subclass's), not to an awaiting caller.
    let streams: Bool
    let cancelled = Atomic<Bool>(false)
    /// `notInstalled` -> `waiting` (the caller, once `continuation` is written) -> `over`
    /// (whoever takes the continuation: the engine delivering, or the cancellation). An
    /// atomic rather than a lock: no mutex allocated and taken twice per request; the
    /// releasing/acquiring exchanges order `continuation` between the threads.
    let waiter = Atomic<UInt8>(0)
    var continuation: UnsafeContinuation<Outcome, Never>?
    /// Drive-token holder only: bytes cut into pieces so far, pieces in flight, first failure.
    var engineCut = 0
    var engineOutstanding = 0
    var engineFailure: (any Error & Sendable)?

    /// A read's result: `buffer` is this array's storage, so the bytes land where the caller
    /// gets them (one copy, bounce slice to array, and no second allocation). Sound because
    /// the operation holds the only reference and never mutates the array through Swift
    /// (the storage neither moves nor is copied) until the engine is done with `buffer` and
    /// the caller takes it (`takeResult`); a cancelled caller never takes it, and the array
    /// lives as long as the operation, after a late completion too.
    var readResult: [UInt8]?

    init(kind: IOKind, offset: UInt64, count: Int, streams: Bool) {
        self.kind = kind
        self.offset = offset
        self.streams = streams
        if kind == .read {
            // A read's bytes are returned only once the device filled all of them.
            var array = [UInt8](unsafeUninitializedCapacity: max(count, 0)) { _, n in n = max(count, 0) }
            buffer = array.withUnsafeMutableBytes { $0 }
            readResult = array
        } else {
            buffer = .allocate(byteCount: max(count, 0), alignment: 64)
            // Writes are filled by `fill`; GET_ID may come back short, so it starts zeroed.
            if kind == .identify { buffer.initializeMemory(as: UInt8.self, repeating: 0) }
        }
    }

    deinit { if kind != .read { buffer.deallocate() } }

    /// Write data, copied in before the operation is queued.
    package func fill(from bytes: [UInt8]) {
        bytes.withUnsafeBytes { b in buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: b.prefix(buffer.count))) }
    }

    var isCancelled: Bool { cancelled.load(ordering: .relaxed) }

    /// Units the engine cuts: bytes, or one for a request without data range.
    var total: Int { kind == .flush || kind == .identify ? 1 : buffer.count }

    /// The bytes a completed operation hands back (once): a read's array, GET_ID's buffer,
    /// else none.
    func takeResult() -> [UInt8] {
        switch kind {
        case .read:
            defer { readResult = nil }
            return readResult ?? []
        case .identify: return [UInt8](UnsafeRawBufferPointer(buffer))
        case .write, .flush: return []
        }
    }

    /// The caller's task was cancelled: resumes it (with nil) now. The pieces already
    /// posted stay the engine's until the device completes them.
    package func cancel() {
        cancelled.store(true, ordering: .releasing)
        takeContinuation()?.resume(returning: .cancelled)
    }

    /// Moves `waiter` to `over`; the continuation if it was waiting (only one caller of
    /// this ever gets it).
    func takeContinuation() -> UnsafeContinuation<Outcome, Never>? {
        guard waiter.exchange(Self.over, ordering: .acquiringAndReleasing) == Self.waiting else { return nil }
        defer { continuation = nil }
        return continuation
    }

    /// Suspends until the outcome (nil: cancelled). The bytes of a read are copied here, on
    /// the caller's thread, not on the engine's.
    func outcome(install: () -> Void) async -> Result<[UInt8], any Error & Sendable>? {
        let outcome = await withUnsafeContinuation { (c: UnsafeContinuation<Outcome, Never>) in
            continuation = c
            let installed = waiter.compareExchange(
                expected: Self.notInstalled, desired: Self.waiting, ordering: .acquiringAndReleasing
            ).exchanged
            if installed {
                install()
            } else {
                // Cancelled first (`over`): nobody else will touch `continuation`.
                continuation = nil
                c.resume(returning: .cancelled)
            }
        }
        switch outcome {
        case .cancelled: return nil
        case .failed(let failure): return .failure(failure)
        case .done: return .success(takeResult())
        }
    }

    /// Drive-token holder: every piece is done; hands the outcome over (once).
    /// `resuming` runs just before an awaiting caller is resumed (not for a caller that
    /// was cancelled first, nor for a stream).
    func deliver(resuming: () -> Void = {}) {
        if streams {
            deliverToStream()
            return
        }
        let result: Outcome = engineFailure.map { .failed($0) } ?? .done
        guard let continuation = takeContinuation() else { return }
        resuming()
        continuation.resume(returning: result)
    }

    /// A stream's delivery (`IOOperation`'s).
    func deliverToStream() {}
}

/// One async call with its failure type: what the device modules build and hand to
/// `IOEngine.perform` / `enqueue`.
package final class IOOperation<Failure: Error & Sendable>: IOOperationCore, @unchecked Sendable {
    // @unchecked: `delivery` is immutable; the rest is `IOOperationCore`'s.
    let delivery: IODelivery<Failure>

    package init(kind: IOKind, offset: UInt64, count: Int, delivery: IODelivery<Failure>) {
        self.delivery = delivery
        if case .stream = delivery {
            super.init(kind: kind, offset: offset, count: count, streams: true)
        } else {
            super.init(kind: kind, offset: offset, count: count, streams: false)
        }
    }

    override func deliverToStream() {
        guard case .stream(let tag, let sink) = delivery else { return }
        let result: Result<[UInt8], Failure>
        if let failure = engineFailure {
            // Only the transport's `Failure` is ever stored (`IOEngine`).
            result = .failure(failure as! Failure)
        } else {
            result = .success(takeResult())
        }
        sink(IOCompletion(tag: tag, result: result))
    }
}

/// Drives one `IOTransport` for awaiting callers. Callers enqueue operations (never
/// blocking: a short lock). The transport is driven by whoever holds the engine's drive
/// token, one at a time: the engine's own thread, or (when the transport allows it,
/// `callersMayDrive`) the awaiting callers' threads, which post, publish and reap
/// completions inline without ever blocking, so a busy device costs no thread hand-off per
/// request. The engine thread holds the transport's exclusive access (`exclusively`, the
/// lease) while callers drive, and is the waiter of last resort: it blocks on the device's
/// eventfd whenever requests are in flight and no caller is about to look at the queue.
package final class IOEngine<Transport: IOTransport>: @unchecked Sendable {
    // @unchecked: `transport` and the `pending`/`inFlight`/`nextTag`/... fields are
    // touched only by the holder of `token` (acquired and released with sequentially
    // consistent atomics, which order those accesses between threads); `inbox` is under its
    // mutex; `wake` is an eventfd (thread-safe); the rest are atomics.
    package typealias Operation = IOOperation<Transport.Failure>

    struct Inbox {
        var operations: [IOOperationCore] = []
        /// The engine thread is (about to be) blocked on `wake` or on the device with the
        /// token, or idle without the lease: the next submitter signals `wake`.
        var sleeping = false
        var stopping = false
    }

    let transport: Transport
    let wake: Notifier
    let inbox = Locked<Inbox>(Inbox())
    /// Completions handled per lease (exclusive hold of a shared queue) before the engine
    /// lets it drain and go, so synchronous callers of the same queue get their turn.
    let budget: Int
    /// The drive token: its holder alone touches the transport and the engine's fields.
    let token = Atomic<Bool>(false)
    /// The engine thread holds `exclusively` (written only with the token held).
    let leased = Atomic<Bool>(false)
    /// Awaiting callers resumed (with an outcome) that have not yet looked at the queue on
    /// their way out: while there are any, one of them will, so the engine need not wait.
    let pendingResumes = Atomic<Int>(0)
    /// Drives by callers' threads (the engine keeps an idle lease only while these move).
    let callerDrives = Atomic<Int>(0)
    /// Completions reaped on awaiting callers' threads rather than the engine thread's.
    package var reapedByCallers: Int { callerReaped.load(ordering: .relaxed) }
    let callerReaped = Atomic<Int>(0)
    /// The engine thread as a `TaskExecutor`: tasks that prefer it run between the
    /// engine's turns at the device, and their requests are posted and reaped there.
    package let executor: DeviceExecutor
    /// How long a parked engine (leased, callers driving) sleeps before it looks itself:
    /// request deadlines (R5) and an idle lease are acted on within this.
    static var parkNanoseconds: UInt64 { 2_000_000 }

    /// `spinIterations` is ignored (kept for source compatibility): the engine thread
    /// waits with the transport's wait (its wait strategy), callers' threads poll for
    /// `inlineSpinNanoseconds`.
    package init(transport: Transport, budget: Int = 4096, spinIterations: Int = 0) throws(SystemError) {
        self.transport = transport
        self.wake = try Notifier()
        self.budget = budget
        self.executor = DeviceExecutor(wake: wake)
        try spawnThread { [self] in run() }.detach()
    }

    /// Operations accepted whose memory the engine still holds: queued, or with a piece
    /// the device has not completed (a cancelled caller's included). For tests of the
    /// cancellation rule.
    package var held: Int { heldCount.load(ordering: .relaxed) }
    let heldCount = Atomic<Int>(0)
    /// Pieces handed to the device's ring so far (tests wait on it: a request counted in
    /// `held` may still be queued here, not yet posted).
    package var posted: Int { postedCount.load(ordering: .relaxed) }
    let postedCount = Atomic<Int>(0)
    /// Operations in the inbox (or a stop request): lets drivers look without the lock.
    let queued = Atomic<Int>(0)

    /// Queues `operation` and, when callers may drive, posts it from this thread if
    /// nobody else is driving (never blocking); false when the engine has stopped.
    package func enqueue(_ operation: Operation) -> Bool {
        submit(operation, spin: false)
    }

    func submit(_ operation: IOOperationCore, spin: Bool) -> Bool {
        if executor.isCurrent && transport.callersMayDrive && leased.load(ordering: .sequentiallyConsistent)
            && transport.mayPollInline && tryAcquire()
        {
            // A task on the engine's executor, between the engine's turns, with the lease
            // held: post at once (no inbox), so the device works on it while the batch's
            // other jobs run (posting only after the batch left the device idle meanwhile).
            return postFromExecutor(operation)
        }
        let (accepted, signal) = inbox.withLock { s -> (Bool, Bool) in
            if s.stopping { return (false, false) }
            heldCount.add(1, ordering: .relaxed)
            s.operations.append(operation)
            queued.add(1, ordering: .sequentiallyConsistent)
            defer { s.sleeping = false }
            return (true, s.sleeping)
        }
        if signal { wake.signal() }
        // On the engine thread (a task preferring its executor), the engine posts it after
        // the current batch of jobs.
        if accepted && transport.callersMayDrive && !executor.isCurrent { drive(spin: spin) }
        return accepted
    }

    /// Engine thread running a job, token held: queues `operation` behind what is pending,
    /// posts what fits and publishes. False (token given back) once the engine is stopping.
    func postFromExecutor(_ operation: IOOperationCore) -> Bool {
        defer { release() }
        _ = absorb()  // a stop request too
        if stopSeen { return false }
        heldCount.add(1, ordering: .relaxed)
        if pendingHead > 0 && pendingHead == pending.count {
            pending.removeAll(keepingCapacity: true)
            pendingHead = 0
        }
        pending.append(operation)
        if leaseHandled < budget { submitPending() }
        transport.publish()
        return true
    }

    /// Runs `operation` for an awaiting caller: suspends (never blocks) until its outcome;
    /// nil if the caller's task was cancelled (then it returns promptly).
    package func perform(_ operation: Operation) async -> Result<[UInt8], Transport.Failure>? {
        typed(await performCore(operation))
    }

    /// `perform` without the failure type (see `IOOperationCore`).
    func performCore(_ operation: IOOperationCore) async -> Result<[UInt8], any Error & Sendable>? {
        let result = await withTaskCancellationHandler {
            await operation.outcome {
                if !submit(operation, spin: true) {
                    operation.engineFailure = transport.closedFailure
                    operation.deliver(resuming: { pendingResumes.add(1, ordering: .sequentiallyConsistent) })
                }
            }
        } onCancel: {
            operation.cancel()
        }
        // A caller resumed with an outcome was counted; the last of them on its way out
        // looks at the queue (or hands the waiting to the engine thread).
        if result != nil && pendingResumes.subtract(1, ordering: .sequentiallyConsistent).newValue == 0
            && transport.callersMayDrive && !executor.isCurrent
        {
            drive(spin: true)
        }
        return result
    }

    /// The engine stores only `Transport.Failure`s.
    func typed(_ result: Result<[UInt8], any Error & Sendable>?) -> Result<[UInt8], Transport.Failure>? {
        switch result {
        case nil: return nil
        case .success(let bytes)?: return .success(bytes)
        case .failure(let failure)?: return .failure(failure as! Transport.Failure)
        }
    }

    /// Stops taking operations; those queued fail with `closedFailure`, those in flight
    /// finish (or fail by their deadline), then the thread ends.
    package func stop() {
        inbox.withLock { $0.stopping = true }
        queued.add(1, ordering: .sequentiallyConsistent)
        wake.signal()
    }

    // MARK: the drive token

    func tryAcquire() -> Bool {
        token.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged
    }

    func release() { token.store(false, ordering: .sequentiallyConsistent) }

    /// Engine thread: callers hold the token only for a non-blocking turn.
    func acquire() {
        var tries = 0
        while !tryAcquire() {
            tries += 1
            if tries & 63 == 0 { sched_yield() }
        }
    }

    /// A caller's turn (its own thread, never blocking): posts what is queued, publishes,
    /// reaps what completed and resumes its owners; with `spin`, when nothing completed,
    /// polls for up to `inlineSpinNanoseconds`. Afterwards, if requests are in flight and
    /// no resumed caller is left to look again, wakes the engine thread to wait for them.
    func drive(spin: Bool) {
        while true {
            guard tryAcquire() else { return }  // the holder looks at the inbox after it
            guard leased.load(ordering: .sequentiallyConsistent), transport.mayPollInline else {
                // The engine thread (signalled by `submit`, or by this) does it.
                release()
                wake.signal()
                return
            }
            callerDrives.add(1, ordering: .relaxed)
            var progress = step()
            // Spin only when no resumed caller is about to run (and look again): a pool
            // thread spinning while resumed callers wait for a thread delays them all.
            if progress == 0 && spin && !inFlight.isEmpty
                && pendingResumes.load(ordering: .sequentiallyConsistent) == 0
            {
                progress = spinForCompletion()
            }
            if progress == 0 && !inFlight.isEmpty { transport.checkDeadlines() }
            if progress > 0 { callerReaped.add(progress, ordering: .relaxed) }
            let busy = !inFlight.isEmpty
            // Drained for the budget, or a head that cannot be posted: the engine's call.
            let drained = !busy && (leaseHandled >= budget || pendingHead < pending.count)
            release()
            if queued.load(ordering: .sequentiallyConsistent) != 0 { continue }
            if (busy && pendingResumes.load(ordering: .sequentiallyConsistent) == 0) || drained { wake.signal() }
            return
        }
    }

    /// Token held: polls until a completion (then reaps it and any others) or the inline
    /// spin is over or new work is queued. Returns the completions handled.
    func spinForCompletion() -> Int {
        let limit = transport.inlineSpinNanoseconds
        guard limit > 0 else { return 0 }
        let start = monotonicNanoseconds()
        var polls = 0
        while true {
            if let c = transport.nextCompletion() {
                complete(tag: c.tag, failure: c.failure)
                return 1 + reap()
            }
            polls += 1
            if polls & 31 == 0 {
                if queued.load(ordering: .relaxed) != 0 || monotonicNanoseconds() &- start >= limit { return 0 }
            }
        }
    }

    // MARK: the engine thread

    var pending: [IOOperationCore] = []
    /// The inbox's array between two `absorb`s (swapped, so neither side reallocates).
    var spare: [IOOperationCore] = []
    var stopSeen = false
    var pendingHead = 0
    var inFlight: [UInt64: IOOperationCore] = [:]
    var nextTag: UInt64 = 1
    /// Completions handled in the current lease.
    var leaseHandled = 0

    func run() {
        executor.attach()
        while true {
            // Jobs first: the device waits for what they post.
            executor.runJobs()
            acquire()
            let stopping = absorb()
            if pendingHead == pending.count && inFlight.isEmpty {
                if stopping {
                    release()
                    transport.engineStopped()
                    // Jobs queued from now on run on the global concurrent executor.
                    executor.close()
                    return
                }
                let idle = executor.mayBlock() && sleepIfIdle()
                release()
                if idle { _ = EventWaiter.wait(for: wake, until: .distantFuture) }
                continue
            }
            release()
            transport.exclusively { session() }
        }
    }

    /// With the transport to itself (the lease): lets callers drive while they do, waits
    /// for the device whenever nobody else will look, until nothing is in flight or pending
    /// (or the budget is spent and what is in flight drained). Returns with the lease given
    /// up and the token free.
    func session() {
        acquire()
        leaseHandled = 0
        leased.store(true, ordering: .sequentiallyConsistent)
        var parkedDrives = -1
        while true {
            // Token held.
            let progress = step()
            if executor.hasJobs {
                // Tasks on the engine's executor, resumed by what `step` reaped (or queued
                // from other threads): run them, then post what they asked for.
                release()
                executor.runJobs()
                acquire()
                continue
            }
            if inFlight.isEmpty {
                let idle = pendingHead == pending.count
                if !idle && leaseHandled < budget {
                    // Nothing in flight and the head cannot be posted: it never will be.
                    failHead()
                    continue
                }
                // Keep an idle lease while callers keep driving (their next request comes
                // within microseconds); give it up after a quiet park.
                let keep =
                    idle && transport.callersMayDrive && !stopSeen && leaseHandled < budget
                    && parkedDrives != callerDrives.load(ordering: .relaxed)
                if !keep {
                    leased.store(false, ordering: .sequentiallyConsistent)
                    release()
                    return
                }
            }
            let callersLook =
                transport.callersMayDrive && !stopSeen
                && (inFlight.isEmpty || (progress > 0 && pendingResumes.load(ordering: .sequentiallyConsistent) > 0))
            if callersLook {
                // Park: callers drive; wake up when one hands the waiting over, or after a
                // while to act on deadlines and on an idle lease.
                release()
                if queued.load(ordering: .sequentiallyConsistent) == 0 && executor.mayBlock() {
                    parkedDrives = callerDrives.load(ordering: .relaxed)
                    _ = EventWaiter.wait(for: wake, until: .after(nanoseconds: Self.parkNanoseconds))
                }
                acquire()
                transport.checkDeadlines()
                continue
            }
            parkedDrives = -1
            if progress > 0 || queued.load(ordering: .sequentiallyConsistent) != 0 { continue }
            // The waiter: block on the device (and `wake`) with the token. Stopping with
            // requests in flight, too: nothing new comes, and the device's wait is what acts
            // on their deadlines once it is closed (R5); skipping it would spin forever.
            if executor.mayBlock() {
                let sleeping = sleepIfIdle()
                if sleeping || stopSeen { transport.waitForCompletion(orWake: wake) }
                if sleeping { inbox.withLock { $0.sleeping = false } }
            }
        }
    }

    /// Token held: moves the inbox into `pending`, posts what fits (unless the lease's
    /// budget is spent), publishes, reaps every completion. Returns the completions handled.
    func step() -> Int {
        var handled = 0
        while true {
            _ = absorb()
            if leaseHandled < budget { submitPending() }
            transport.publish()
            let n = reap()
            handled += n
            // Completions made room: post what waits for it.
            if n == 0 || pendingHead == pending.count || leaseHandled >= budget { return handled }
        }
    }

    /// Token held: handles every completion available now.
    func reap() -> Int {
        var n = 0
        while let c = transport.nextCompletion() {
            n += 1
            complete(tag: c.tag, failure: c.failure)
        }
        return n
    }

    /// Moves the inbox into `pending`; true once the engine is stopping.
    func absorb() -> Bool {
        if queued.load(ordering: .sequentiallyConsistent) == 0 { return stopSeen }
        let stopping = inbox.withLock { s -> Bool in
            s.sleeping = false
            swap(&s.operations, &spare)
            queued.store(0, ordering: .sequentiallyConsistent)
            return s.stopping
        }
        stopSeen = stopping
        if pendingHead > 0 && pendingHead == pending.count {
            pending.removeAll(keepingCapacity: true)
            pendingHead = 0
        }
        pending.append(contentsOf: spare)
        spare.removeAll(keepingCapacity: true)
        if stopping {
            while pendingHead < pending.count {
                let op = pending[pendingHead]
                pendingHead += 1
                op.engineFailure = op.engineFailure ?? transport.closedFailure
                op.engineCut = op.total
                if op.engineOutstanding == 0 { release(op) }
            }
        }
        return stopping
    }

    /// Marks the thread asleep unless work arrived; true: block now.
    func sleepIfIdle() -> Bool {
        inbox.withLock { s in
            guard s.operations.isEmpty && !s.stopping else { return false }
            s.sleeping = true
            return true
        }
    }

    func submitPending() {
        while pendingHead < pending.count {
            let op = pending[pendingHead]
            let total = op.total
            let whole = op.kind == .flush || op.kind == .identify
            while op.engineCut < total && op.engineFailure == nil && !op.isCancelled {
                let length = whole ? op.buffer.count : min(transport.maxPieceBytes, total - op.engineCut)
                let start = whole ? 0 : op.engineCut
                let piece = IOPiece(
                    kind: op.kind, offset: op.offset + UInt64(start),
                    buffer: UnsafeMutableRawBufferPointer(rebasing: op.buffer[start..<start + length]))
                let tag = nextTag
                do throws(Transport.Failure) {
                    guard try transport.post(piece, tag: tag) else { return }  // full: after a completion
                } catch {
                    op.engineFailure = error
                    break
                }
                nextTag &+= 1
                postedCount.add(1, ordering: .relaxed)
                inFlight[tag] = op
                op.engineOutstanding += 1
                op.engineCut += whole ? 1 : length
            }
            pendingHead += 1
            op.engineCut = total
            if op.engineOutstanding == 0 { release(op) }
        }
    }

    func complete(tag: UInt64, failure: Transport.Failure?) {
        leaseHandled += 1
        guard let op = inFlight.removeValue(forKey: tag) else { return }
        op.engineOutstanding -= 1
        if let failure, op.engineFailure == nil { op.engineFailure = failure }
        if op.engineOutstanding == 0 && op.engineCut >= op.total { release(op) }
    }

    /// Every piece of `op` is done (or was never posted): its memory goes back with it.
    func release(_ op: IOOperationCore) {
        heldCount.subtract(1, ordering: .relaxed)
        op.deliver(resuming: { pendingResumes.add(1, ordering: .sequentiallyConsistent) })
    }

    func failHead() {
        guard pendingHead < pending.count else { return }
        let op = pending[pendingHead]
        op.engineFailure = op.engineFailure ?? transport.noRoomFailure
        op.engineCut = op.total
        pendingHead += 1
        if op.engineOutstanding == 0 { release(op) }
    }
}

extension IOEngine {
    /// An awaiting caller's operation of `kind` over `count` bytes at `offset` (write data
    /// in `bytes`).
    package func run(_ kind: IOKind, offset: UInt64, count: Int, bytes: [UInt8]? = nil) async
        -> Result<[UInt8], Transport.Failure>?
    {
        let op = IOOperationCore(kind: kind, offset: offset, count: count, streams: false)
        if let bytes { op.fill(from: bytes) }
        return typed(await performCore(op))
    }
}

/// An async call on a device that was closed first (or while the call waited to be posted).
public struct DeviceClosedError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The error.
    public init() {}
    /// "the device is closed"
    public var description: String { "the device is closed" }
}
