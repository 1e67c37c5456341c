#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A device's I/O thread as a `TaskExecutor` (SE-0417): tasks that prefer it run on the
/// thread that reaps their completions, so a completed request resumes its task with no
/// thread hand-off (no cooperative-pool thread woken per request).
///
/// Opt in per task or task group, through the device (`VirtioBlockDriver.executor()`):
///
/// ```swift
/// let executor = try disk.executor()
/// try await withThrowingTaskGroup(of: Void.self) { group in
///     for _ in 0..<32 {
///         group.addTask(executorPreference: executor) { _ = try await disk.read(at: 0, count: 4096) }
///     }
///     try await group.waitForAll()
/// }
/// ```
///
/// The thread alternates between the jobs of those tasks and the device: it runs every
/// job queued, then posts what they asked for (one doorbell for the batch), reaps what
/// completed (each completion queues its task's next job on this thread), and waits for
/// the device only when it has no job left. Jobs enqueued from other threads wake it. It
/// is one thread: a job that blocks (a synchronous call, a lock held elsewhere, a long
/// computation) stalls every task on it and the device's I/O; in particular, never call
/// the same device's synchronous API from such a task (the thread may hold its queue).
/// Tasks without the preference are served as before, on the cooperative pool.
///
/// After the device is closed and its I/O thread has ended, jobs still enqueued here are
/// handed to the global concurrent executor: a task that prefers a closed device's
/// executor keeps running, on the pool.
public final class DeviceExecutor: TaskExecutor, @unchecked Sendable {
    // @unchecked: `local` and `batch` are touched only by the executor's own thread (the
    // thread whose id `owner` holds, set by that thread); `remote` is under its lock; the
    // counters are atomics; `wake` is an eventfd (thread-safe).
    struct Remote {
        var jobs: [UnownedJob] = []
        /// The thread is (about to be) blocked: the next enqueue signals `wake`.
        var waiting = false
        var closed = false
    }

    let wake: Notifier
    let remote = Locked<Remote>(Remote())
    /// Jobs in `remote`: lets the thread look without the lock.
    let remoteCount = Atomic<Int>(0)
    /// The running thread's `pthread_t` (0: none, or closed).
    let owner = Atomic<UInt>(0)
    var local: [UnownedJob] = []
    var batch: [UnownedJob] = []
    let runCount = Atomic<Int>(0)
    let forwardedCount = Atomic<Int>(0)

    package init(wake: Notifier) {
        self.wake = wake
    }

    /// Jobs run on the device's thread so far.
    package var jobsRun: Int { runCount.load(ordering: .relaxed) }
    /// Jobs handed to the global concurrent executor because the thread had ended.
    package var jobsForwarded: Int { forwardedCount.load(ordering: .relaxed) }

    /// Queues `job` to run on the device's I/O thread (or, once that thread has ended, on
    /// the global concurrent executor).
    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        if isCurrent {
            // Resumed by this thread (a completion it reaped): runs in its next batch.
            local.append(job)
            return
        }
        let (signal, closed) = remote.withLock { s -> (Bool, Bool) in
            if s.closed { return (false, true) }
            s.jobs.append(job)
            remoteCount.add(1, ordering: .releasing)
            defer { s.waiting = false }
            return (s.waiting, false)
        }
        if closed {
            forward(job)
        } else if signal {
            wake.signal()
        }
    }

    /// Whether the calling thread is this executor's.
    package var isCurrent: Bool { owner.load(ordering: .relaxed) == UInt(pthread_self()) }

    /// Whether the device's I/O thread has ended (`close()`): every job enqueued from now on
    /// runs on the global concurrent executor.
    package var isClosed: Bool { remote.withLock { $0.closed } }

    func forward(_ job: UnownedJob) {
        forwardedCount.add(1, ordering: .relaxed)
        globalConcurrentExecutor.enqueue(job)
    }

    // MARK: the executor's thread

    /// The calling thread becomes the executor's.
    package func attach() {
        owner.store(UInt(pthread_self()), ordering: .releasing)
    }

    /// Executor thread: whether jobs are waiting.
    package var hasJobs: Bool { !local.isEmpty || remoteCount.load(ordering: .acquiring) > 0 }

    /// Executor thread: runs the jobs queued now (not those they queue: the next batch).
    /// Returns how many ran.
    @discardableResult
    package func runJobs() -> Int {
        if remoteCount.load(ordering: .acquiring) > 0 {
            remote.withLock { s in
                local.append(contentsOf: s.jobs)
                s.jobs.removeAll(keepingCapacity: true)
                s.waiting = false
                remoteCount.store(0, ordering: .relaxed)
            }
        }
        guard !local.isEmpty else { return 0 }
        swap(&local, &batch)
        let me = asUnownedTaskExecutor()
        for job in batch { job.runSynchronously(on: me) }
        let n = batch.count
        batch.removeAll(keepingCapacity: true)
        runCount.add(n, ordering: .relaxed)
        return n
    }

    /// Executor thread, before it blocks on `wake` (or on the device with `wake`): false
    /// if jobs are waiting (run them instead); else later enqueues signal `wake`.
    package func mayBlock() -> Bool {
        guard local.isEmpty else { return false }
        return remote.withLock { s in
            guard s.jobs.isEmpty else { return false }
            s.waiting = true
            return true
        }
    }

    /// Executor thread: the thread ends. Jobs still queued, and every later one, go to the
    /// global concurrent executor.
    package func close() {
        let pending = remote.withLock { s -> [UnownedJob] in
            s.closed = true
            defer { s.jobs = [] }
            return s.jobs
        }
        remoteCount.store(0, ordering: .relaxed)
        owner.store(0, ordering: .releasing)
        let mine = local
        local = []
        for job in mine + pending { forward(job) }
    }
}
