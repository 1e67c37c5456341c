#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
import Synchronization
import Virtqueue

/// The call eventfd of one vring. QEMU replaces it while the queue runs (MSI-X vector
/// changes, masking), so the worker reads it under a lock each time it signals.
final class CallSlot: Sendable {
    private let notifier = Locked<Notifier?>(nil)

    func replace(with new: Notifier?) { notifier.withLock { $0 = new } }

    /// False when the front-end made the write block (see `Notifier`).
    func signal() -> Bool { notifier.withLock { $0?.signal() ?? true } }
}

/// Timing knobs of a queue thread (rule R5: every wait has a deadline; §5: spin briefly,
/// then block).
public struct QueueTiming: Sendable {
    /// How long to keep polling the avail ring after the last request before blocking,
    /// at first. It then adapts (as QEMU's adaptive polling): it grows when the kick that
    /// ended a block came soon after (a longer spin would have caught it without two
    /// wake-ups), and shrinks when blocks are long (spinning was wasted).
    public var spinNanoseconds: UInt64 = 20_000
    /// Upper bound of the adaptive spin (2 cores here: never spin for long).
    public var maximumSpinNanoseconds: UInt64 = 100_000
    /// Longest block on the kick eventfd; the handler's `idle` hook runs after each.
    public var idleTick: Double = 1.0
    /// Poll interval for a ring whose front-end sent no kick fd (polling mode).
    public var pollingIntervalNanoseconds: UInt64 = 200_000
    /// `.adaptive` (default): the spin above, adapting; `.poll`: never block on the kick
    /// eventfd (one CPU busy per queue, the `idle` hook still runs every `idleTick`);
    /// `.spin(nanoseconds:)`: a fixed spin; `.interrupts`: block at once.
    public var wait: WaitStrategy = .adaptive

    /// The defaults.
    public init() {}
}

/// One running queue: its thread, its ring, its handler. Everything here is touched only
/// by the queue's thread between `start` and `stop` (the join in `stop` hands it back).
final class QueueWorker: @unchecked Sendable {
    // @unchecked Sendable: see above; `start` hands the state to the thread and the join in
    // `stop` hands it back (both are synchronization points), `stopping` is atomic.
    let index: Int
    let queue: any DeviceRing
    let memory: GuestMemory
    let handler: any QueueHandler
    let kick: Notifier?
    let call: CallSlot
    let err: Notifier?
    let timing: QueueTiming
    let report: @Sendable (BackendEvent) -> Void
    private let wake: Notifier
    private let stopping = Atomic<Bool>(false)
    private var thread: SpawnedThread?
    /// Kicks that bring no work are a storm: the shared back-off policy (R5).
    private var kickBackoff = WakeBackoff()

    init(
        index: Int, queue: any DeviceRing, memory: GuestMemory, handler: any QueueHandler,
        kick: Notifier?, call: CallSlot, err: Notifier?, timing: QueueTiming,
        report: @escaping @Sendable (BackendEvent) -> Void
    ) throws(SystemError) {
        self.index = index
        self.queue = queue
        self.memory = memory
        self.handler = handler
        self.kick = kick
        self.call = call
        self.err = err
        self.timing = timing
        self.report = report
        self.wake = try Notifier()
    }

    func start() throws(SystemError) {
        handler.attach(wake: QueueWake(wake))
        thread = try spawnThread { [self] in run() }
    }

    /// Stops the thread and returns the vring base (what GET_VRING_BASE reports).
    /// Every popped chain was completed by the handler, so used.idx has caught up too.
    func stop() -> UInt32 {
        stopping.store(true, ordering: .releasing)
        wake.signal()
        thread?.join()
        thread = nil
        return queue.vringBase
    }

    private var shouldStop: Bool { stopping.load(ordering: .acquiring) }

    private func run() {
        let budget = Int(queue.queueSize)
        var spinStart: UInt64 = 0
        let maximumSpin = max(timing.maximumSpinNanoseconds, timing.spinNanoseconds)
        var spinLimit = timing.spinNanoseconds
        switch timing.wait {
        case .adaptive: break
        case .poll: spinLimit = .max
        case .spin(let ns): spinLimit = ns
        }
        let adaptive = timing.wait == .adaptive
        var lastIdle = monotonicNanoseconds()
        queue.disableNotifications()
        while !shouldStop {
            if queue.isBroken {
                _ = waitForKick(timeoutNanoseconds: UInt64(timing.idleTick * 1e9))
                continue
            }
            let served: Int
            do {
                served = try handler.serve(queue, memory: memory, budget: budget)
            } catch {
                fail(error)
                continue
            }
            if served > 0 {
                publish()
                spinStart = 0
                kickBackoff.note(productive: true)
                continue
            }
            // Nothing to do: spin briefly (cheap re-checks of avail.idx), then block.
            let now = monotonicNanoseconds()
            if spinStart == 0 { spinStart = now }
            if now &- spinStart < spinLimit {
                if spinLimit == .max && now &- lastIdle >= UInt64(timing.idleTick * 1e9) {
                    lastIdle = now
                    handler.idle(queue, memory: memory)
                    publish()
                }
                sched_yield()
                continue
            }
            spinStart = 0
            // Entries already available are a reason to poll again only if they are the
            // handler's work (a net receive queue with buffers but no frames blocks).
            if queue.enableNotifications() && handler.workIsAvailable(queue) {
                queue.disableNotifications()
                continue
            }
            let timeout =
                kick == nil ? timing.pollingIntervalNanoseconds : UInt64(timing.idleTick * 1e9)
            let blockStart = monotonicNanoseconds()
            let (kicked, woken) = waitForKick(timeoutNanoseconds: timeout)
            queue.disableNotifications()
            if kick != nil && adaptive {
                let blocked = monotonicNanoseconds() &- blockStart
                if kicked && blocked < maximumSpin {
                    spinLimit = min(maximumSpin, max(spinLimit &* 2, 4_000))
                } else {
                    spinLimit /= 2
                }
            }
            // Kicks that never bring work are a storm: back off so it costs the front-end
            // time, not us CPU (R5). Any served request resets the count.
            if kicked {
                kickBackoff.note(productive: false)
                kickBackoff.pause()
            }
            if !kicked && kick != nil && !shouldStop && !woken {
                handler.idle(queue, memory: memory)
                publish()
            }
        }
        // Chains a handler still holds (net: a frame waiting for more receive buffers)
        // are completed before GET_VRING_BASE reads the index.
        if !queue.isBroken && handler.stopping(queue, memory: memory) > 0 { publish() }
    }

    private func publish() {
        handler.beforePublish(queue, memory: memory)
        if queue.publishUsed() && !call.signal() { fail(.notifierBlocked(role: "call")) }
    }

    /// Rule R6: the queue stops serving, the err fd (if any) is signalled, the event is
    /// reported once; other queues and the connection go on.
    private func fail(_ violation: Violation) {
        queue.breakQueue(violation)
        report(.queueFailed(queue: index, violation))
        err?.signal()
    }

    /// Blocks on the kick fd and our wake fd. Returns whether a kick arrived, and whether
    /// the handler's `QueueWake` (work from another queue) ended the wait.
    private func waitForKick(timeoutNanoseconds: UInt64) -> (kicked: Bool, woken: Bool) {
        // The wake fd (ours, for stop and `QueueWake`) outranks the kick; a drained kick
        // counter says nothing about how many requests exist (R5): the ring is the truth.
        let deadline = Deadline.after(nanoseconds: timeoutNanoseconds)
        switch EventWaiter.wait(for: kick, orReadable: wake.fileDescriptor, until: deadline) {
        case .notified: return (true, false)
        case .other:
            if !shouldStop { wake.drain() }
            return (false, true)
        case .timedOut: return (false, false)
        }
    }
}
