#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import Synchronization
import Virtqueue

/// The control plane as the supervisor sees it: the `VirtioBlockDriver`, held weakly so that the
/// supervisor (which every queue holds) keeps no device alive and no queue ever holds or
/// calls the device itself.
protocol ControlPlane: AnyObject, Sendable {
    /// Under the supervisor's lock: announces queue `index`'s freshly reset ring on the
    /// current connection, with one bound for the whole announcement (R5).
    func announce(queue index: Int) throws(VirtioError)
    /// The reconnection owner's part (control plane only), on whichever thread became the
    /// owner; ends the reconnect through `endReconnect` before it returns.
    func runReconnect() throws(VirtioError)
}

/// What a `VirtioBlockDriver` and its queues share, and nothing else: the failure sink (R6: the
/// first failure wins, wakes every queue, reaches `onFailure` once), the watch on the
/// control socket, and the park/resume state of a reconnect. It holds no queue and only a
/// weak reference to the device, so a queue's thread reaches the control plane only
/// through it, and only on its slow path.
///
/// Handoff with one thread per queue: the first thread to see the control socket close
/// (or to call `reconnect()`) becomes the owner and runs the device's control-plane part;
/// `epoch` moves, so every queue's next call takes its slow path (`BlockQueue.settle`),
/// where it parks until the generation changes, then resets, resubmits and announces its
/// own ring on its own thread.
final class DriverSupervisor: @unchecked Sendable {
    // @unchecked Sendable: shared state is in `link` (a pthread mutex) or atomics; the weak
    // `controlPlane` is set once, by the device's `init`, before any queue can reach it.
    /// Reconnection and failure state, and the lock the device's control connection is
    /// used under.
    struct Link {
        /// Bumped by every successful reconnect.
        var generation: UInt64 = 1
        /// The current connection's socket, for the hang-up check.
        var descriptor: Int32
        /// A thread owns a reconnect in progress: queue threads park, nobody else touches
        /// the control connection.
        var reconnecting = false
        var reconnectStarted = Deadline.now
        /// Per queue: the generation its ring was last announced on.
        var attached: [UInt64]
        /// Queues announced before this generation hand back their in-flight requests as
        /// failures (`dropReason`) before they re-attach: the device they were posted to
        /// broke a rule and may have written their bounce memory (R6).
        var dropBefore: UInt64 = 0
        var dropReason = VirtioError.disconnected("reconnected after a failure")
        var closed = false
        /// The sticky failure (R6), until a reconnect ends it.
        var failure: VirtioError?
    }

    let link: Locked<Link>
    /// Moves (under `link`'s lock) whenever the queues must look at `link`: a failure, a
    /// reconnect starting or ending. A queue compares it with the value it last settled
    /// on: the one relaxed load its hot path pays for "broken or reconnecting?".
    let epoch = Atomic<UInt64>(0)
    /// Whether `link.failure` is set: one load for `isBroken`.
    let broken = Atomic<Bool>(false)
    /// The control socket's descriptor (low 32 bits) and the connection generation it
    /// belongs to (high 32 bits), for queue threads that block on it without the lock.
    let control: Atomic<UInt64>
    /// Each queue's call eventfd (ours; the device cannot see these signals), to wake
    /// threads blocked on other queues.
    let wakers: [Notifier]
    let reconnects: Bool
    let controlTimeout: Double
    let reconnectTimeout: Double
    let onFailure: (@Sendable (VirtioError) -> Void)?
    /// Set once by the device before any queue is handed out.
    weak var controlPlane: (any ControlPlane)?

    init(descriptor: Int32, wakers: [Notifier], options: VirtioBlockDriver.Options) {
        link = Locked(Link(descriptor: descriptor, attached: Array(repeating: 1, count: wakers.count)))
        control = Atomic(Self.controlWord(generation: 1, descriptor: descriptor))
        self.wakers = wakers
        reconnects = options.reconnect
        controlTimeout = options.controlTimeout
        reconnectTimeout = options.reconnectTimeout
        onFailure = options.onFailure
    }

    static func controlWord(generation: UInt64, descriptor: Int32) -> UInt64 {
        (generation << 32) | UInt64(UInt32(bitPattern: descriptor))
    }

    // MARK: failure sink

    var isBroken: Bool { broken.load(ordering: .acquiring) }

    var failure: VirtioError? {
        guard isBroken else { return nil }
        return link.withLock { $0.failure }
    }

    /// Marks the device broken (first failure wins) and reports it once. A timeout while
    /// a reconnect is under way is not a failure: resubmission stamps fresh deadlines.
    func fail(_ error: VirtioError) {
        let first = link.withLock { l -> Bool in
            if l.reconnecting, case .timeout = error { return false }
            return recordFailure(error, in: &l)
        }
        guard first else { return }
        // Threads blocked on other queues fail their requests now, not at their deadlines.
        wakeQueues()
        onFailure?(error)
    }

    /// Under `link`'s lock: records the failure and sends every queue to its slow path.
    /// Returns whether it was the first.
    func recordFailure(_ error: VirtioError, in l: inout Link) -> Bool {
        raiseAttention()
        guard l.failure == nil else { return false }
        l.failure = error
        broken.store(true, ordering: .releasing)
        return true
    }

    /// Under `link`'s lock: every queue's next call takes its slow path.
    func raiseAttention() {
        epoch.wrappingAdd(1, ordering: .relaxed)
    }

    func wakeQueues() {
        for w in wakers { w.signal() }
    }

    // MARK: control-socket watch

    /// The control socket's descriptor and the generation tag it belongs to, read without
    /// the lock by queue threads about to block on it.
    var watch: (descriptor: Int32, generation: UInt32) {
        let word = control.load(ordering: .acquiring)
        return (Int32(bitPattern: UInt32(truncatingIfNeeded: word)), UInt32(truncatingIfNeeded: word >> 32))
    }

    /// The control socket of connection `seen` became readable: the back-end closed it (or
    /// spoke unasked, which it never may). With `reconnect`, this thread becomes the
    /// reconnection's owner unless one is already under way (then the signal is stale).
    func controlSocketSignalled(generation seen: UInt32) {
        enum Verdict { case ignore, spoke, hungUp, reconnect }
        let verdict = link.withLock { l -> Verdict in
            guard !l.closed, !l.reconnecting, UInt32(truncatingIfNeeded: l.generation) == seen else { return .ignore }
            switch UnixChannel.peerState(of: l.descriptor) {
            case .spoke: return .spoke
            case .quiet: return .ignore
            case .hungUp: break
            }
            guard reconnects else { return .hungUp }
            beginReconnect(&l)
            return .reconnect
        }
        switch verdict {
        case .ignore: return
        case .spoke: fail(.deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket")))
        case .hungUp: fail(.disconnected("back-end closed the vhost-user socket"))
        case .reconnect: ownReconnect()
        }
    }

    // MARK: park and resume

    /// Under `link`'s lock: the calling thread becomes the reconnection's owner.
    func beginReconnect(_ l: inout Link) {
        l.reconnecting = true
        l.reconnectStarted = .now
        raiseAttention()
    }

    enum Claim { case closed, owner, waiter }

    /// For an explicit `reconnect()`: the caller owns it, or waits for the owner.
    func claimReconnect() -> Claim {
        link.withLock { l -> Claim in
            if l.closed { return .closed }
            if l.reconnecting { return .waiter }
            beginReconnect(&l)
            return .owner
        }
    }

    /// The owner's turn, right after `beginReconnect`: parked threads are woken to see the
    /// reconnect, then the device's control plane reconnects (a failure is recorded for
    /// every queue by `endReconnect`).
    func ownReconnect() {
        wakeQueues()
        guard let plane = controlPlane else {
            endReconnect(failing: .disconnected("the device is gone"))
            return
        }
        try? plane.runReconnect()
    }

    /// Installs the new connection (`install` runs under the lock; a reconnect ends a
    /// failure: recovery is explicit, R6), or `discard`s it when the device was closed
    /// meanwhile; then wakes every parked queue thread.
    func endReconnect(descriptor: Int32, install: () -> Void, discard: () -> Void) {
        link.withLock { l in
            l.reconnecting = false
            raiseAttention()
            guard !l.closed else { return discard() }
            install()
            l.generation += 1
            l.descriptor = descriptor
            control.store(Self.controlWord(generation: l.generation, descriptor: descriptor), ordering: .releasing)
            if let previous = l.failure {
                if case .disconnected = previous {
                } else {
                    l.dropBefore = l.generation
                    l.dropReason = previous
                }
                l.failure = nil
                broken.store(false, ordering: .releasing)
            }
        }
        wakeQueues()
    }

    /// Ends a reconnect that found no back-end: the device fails with `error`.
    func endReconnect(failing error: VirtioError) {
        let first = link.withLock { l -> Bool in
            l.reconnecting = false
            return recordFailure(error, in: &l)
        }
        wakeQueues()
        if first { onFailure?(error) }
    }

    /// Parks a queue thread (or a `reconnect()` caller) while another thread reconnects.
    /// Returns true once no reconnect is under way, false when `limit` passed first.
    /// Bounded: past the owner's deadline plus a last attempt's replies, the device fails.
    func awaitReconnect(until limit: Deadline, notifier: Notifier?) -> Bool {
        let patience = reconnectTimeout + 8 * controlTimeout + 1
        while true {
            guard let started = link.withLock({ l in l.reconnecting ? l.reconnectStarted : nil }) else { return true }
            let giveUp = Deadline(uptimeNanoseconds: started.uptimeNanoseconds &+ UInt64(patience * 1e9))
            if giveUp.hasPassed {
                fail(.disconnected("reconnect did not finish within \(Int(patience)) s"))
                return true
            }
            if limit.hasPassed { return false }
            let until = min(giveUp, limit, .after(seconds: 0.05))
            guard let notifier else {
                usleep(1000)
                continue
            }
            // The owner signals every call eventfd when it is done; other wake-ups come
            // from a back-end that kept the descriptor and are slowed down (R5).
            if notifier.wait(until: until) > 0 { usleep(1000) }
        }
    }

    /// Where queue `index` stands, for its slow path.
    enum Step {
        /// Attached to the current connection as of `epoch`.
        case ready(epoch: UInt64)
        case failed(VirtioError)
        case reconnecting
        /// Reset, resubmit and announce the ring on connection `generation`.
        case attach(generation: UInt64)
    }

    func step(queue index: Int, inFlight: Int) -> Step {
        link.withLock { l -> Step in
            if let failure = l.failure { return .failed(failure) }
            if l.reconnecting { return .reconnecting }
            if l.attached[index] == l.generation { return .ready(epoch: epoch.load(ordering: .relaxed)) }
            if l.attached[index] < l.dropBefore && inFlight > 0 { return .failed(l.dropReason) }
            return .attach(generation: l.generation)
        }
    }

    /// Announces queue `index`'s rebuilt ring on connection `generation` through the
    /// control plane. Returns whether it was announced (the queue then kicks); a lost
    /// connection starts a reconnect this thread owns.
    func announce(queue index: Int, generation: UInt64) -> Bool {
        enum Announced {
            case yes, retry
            case lost(VirtioError)
            case reconnect
        }
        let announced = link.withLock { l -> Announced in
            guard !l.reconnecting, l.generation == generation, l.failure == nil else { return .retry }
            guard let plane = controlPlane else { return .lost(.disconnected("the device is gone")) }
            do throws(VirtioError) {
                try plane.announce(queue: index)
            } catch {
                if error.violationCause != nil { return .lost(error) }
                guard reconnects, !l.closed else { return .lost(error) }
                beginReconnect(&l)
                return .reconnect
            }
            l.attached[index] = generation
            return .yes
        }
        switch announced {
        case .yes: return true
        case .retry: return false
        case .lost(let e): fail(e)
        case .reconnect: ownReconnect()
        }
        return false
    }

    /// For the device's `close()`: runs `body` under the lock once, unless a reconnect is
    /// under way (its owner closes what it connects). `attached` lists the queues whose
    /// rings are announced on a healthy connection (stop them), nil after a failure.
    func closeOnce(_ body: (_ attached: [Int]?) -> Void) {
        link.withLock { l in
            guard !l.closed else { return }
            l.closed = true
            guard !l.reconnecting else { return }
            body(l.failure == nil ? l.attached.indices.filter { l.attached[$0] == l.generation } : nil)
        }
    }
}
