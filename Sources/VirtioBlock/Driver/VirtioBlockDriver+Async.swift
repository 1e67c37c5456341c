public import SharedMemory
import Synchronization

/// The async engine's state on a device: not started, running, or stopped by `close()`
/// (keeping the engine's executor, which tasks may still prefer, as long as the device).
enum AsyncEngineSlot {
    case none
    case running(IOEngine<BlockQueueTransport>)
    case closed(DeviceExecutor?)
}

// MARK: async calls (suspend; completions resume them from the device's I/O thread)

extension VirtioBlockDriver {
    /// Reads `count` bytes at `offset` (block-aligned) without blocking a thread.
    ///
    /// The first async call starts the device's I/O thread, which drives queue 0 (taking
    /// it from the synchronous convenience calls while it has requests in flight) and
    /// resumes the caller when its request completes; the caller's task only suspends.
    ///
    /// Cancellation: a cancelled task gets `CancellationError` at once. Its request, if the
    /// device already has it, stays in flight: the bounce slice the device writes into and
    /// the memory the data is copied to belong to the request until the device completes
    /// it or the device is broken and reset (R6), never to another request in between.
    ///
    /// - Throws: `VirtioError` (as the synchronous call) or `CancellationError`.
    public func read(at offset: UInt64, count: Int) async throws -> [UInt8] {
        try info.checkRange(offset: offset, length: count, transferLimit: false)
        return try await perform(.read, offset: offset, count: count)
    }

    /// Writes `bytes` at `offset` (block-aligned) without blocking a thread; the data is
    /// copied before the call suspends. Cancellation as for `read(at:count:)`: the write may
    /// still reach the disk.
    public func write(at offset: UInt64, bytes: [UInt8]) async throws {
        guard !info.readOnly else { throw VirtioError.readOnly }
        try info.checkRange(offset: offset, length: bytes.count, transferLimit: false)
        _ = try await perform(.write, offset: offset, count: bytes.count, bytes: bytes)
    }

    /// Flushes the device's write cache without blocking a thread.
    public func flush() async throws {
        guard info.supportsFlush else { throw VirtioError.unsupported("VIRTIO_BLK_F_FLUSH") }
        _ = try await perform(.flush, offset: 0, count: 0)
    }

    /// GET_ID without blocking a thread: the device's serial, up to 20 bytes.
    public func identify() async throws -> String {
        let id = try await perform(.identify, offset: 0, count: BlockProtocol.idSize)
        return String(decoding: id.prefix(while: { $0 != 0 }), as: UTF8.self)
    }

    /// The device's I/O thread as a `TaskExecutor`: tasks that prefer it
    /// (`withTaskExecutorPreference`, `Task(executorPreference:)`,
    /// `group.addTask(executorPreference:)`) run on the thread that posts their requests
    /// and reaps their completions, so a completed read resumes its task with no thread
    /// hand-off. Starts the I/O thread, as the first async call does.
    ///
    /// ```swift
    /// let executor = try disk.executor()
    /// try await withThrowingTaskGroup(of: Void.self) { group in
    ///     for i in 0..<32 {
    ///         group.addTask(executorPreference: executor) {
    ///             _ = try await disk.read(at: UInt64(i) * 4096, count: 4096)
    ///         }
    ///     }
    ///     try await group.waitForAll()
    /// }
    /// ```
    ///
    /// One thread runs every such task and the device's queue 0: a task on it must not
    /// block (no synchronous call of this device: the thread may hold queue 0's lock, and
    /// the call would wait for itself). Tasks without the preference are unaffected. After
    /// `close()`, tasks that still prefer it run on the global concurrent executor.
    ///
    /// - Throws: `VirtioError.disconnected` once the device is closed, `.system` if the
    ///   thread cannot be started.
    public func executor() throws(VirtioError) -> DeviceExecutor {
        try engine().executor
    }

    /// Posts requests from async code and delivers their completions as an `AsyncSequence`
    /// (`BlockPipeline.completions`), for callers that keep many in flight. Runs on the
    /// same I/O thread and queue as the async calls.
    public func pipeline() throws(VirtioError) -> BlockPipeline {
        BlockPipeline(device: self, engine: try engine())
    }

    func perform(_ kind: IOKind, offset: UInt64, count: Int, bytes: [UInt8]? = nil) async throws -> [UInt8] {
        let engine = try engine()
        guard let result = await engine.run(kind, offset: offset, count: count, bytes: bytes) else {
            throw CancellationError()
        }
        return try result.get()
    }

    /// The running engine, started on first use.
    func engine() throws(VirtioError) -> IOEngine<BlockQueueTransport> {
        try asyncEngine.withLock { (slot: inout AsyncEngineSlot) throws(VirtioError) -> IOEngine<BlockQueueTransport> in
            switch slot {
            case .running(let engine): return engine
            case .closed: throw VirtioError.disconnected("the device is closed")
            case .none:
                let transport = BlockQueueTransport(
                    queue: queues[0], region: region, lock: convenienceLock,
                    pieceBytes: max(info.blockSize, transferChunk / info.blockSize * info.blockSize))
                do throws(SystemError) {
                    let engine = try IOEngine(transport: transport)
                    slot = .running(engine)
                    return engine
                } catch {
                    throw VirtioError.system(error.description)
                }
            }
        }
    }

    /// `close()`: queued async calls fail as disconnected; those in flight finish or fail
    /// by their deadline, then the I/O thread ends.
    func stopAsyncEngine() {
        let engine = asyncEngine.withLock { slot -> IOEngine<BlockQueueTransport>? in
            switch slot {
            case .running(let engine):
                slot = .closed(engine.executor)
                return engine
            case .none:
                slot = .closed(nil)
                return nil
            case .closed:
                return nil
            }
        }
        engine?.stop()
    }
}

/// Requests posted from async code; their completions come back, tagged, through
/// `completions`, an `AsyncSequence` that ends after `finish()` once every request posted
/// before it has completed.
///
/// ```swift
/// let pipe = try disk.pipeline()
/// for i in 0..<32 { try pipe.read(at: UInt64(i) * 4096, count: 4096, tag: UInt64(i)) }
/// pipe.finish()
/// for await c in pipe.completions { use(c.tag, try c.result.get()) }
/// ```
///
/// Posting never blocks nor suspends (requests wait in the engine while the queue is
/// full). Cancellation of the consuming task does not cancel posted requests: each one
/// completes (or fails with the device) and its memory stays the engine's until then.
public final class BlockPipeline: Sendable {
    /// One completion: the tag given when posting, the bytes read (empty for writes and
    /// flushes) or the `VirtioError`.
    public typealias Completion = IOCompletion<VirtioError>

    /// Completions in the order the device finished them.
    public let completions: AsyncStream<Completion>
    let bookkeeping = PipelineCompletions<VirtioError>()
    let engine: IOEngine<BlockQueueTransport>
    let info: BlockInfo

    init(device: VirtioBlockDriver, engine: IOEngine<BlockQueueTransport>) {
        completions = bookkeeping.stream
        self.engine = engine
        self.info = device.info
    }

    /// Posts a read of `count` bytes at `offset` (block-aligned); the completion carries
    /// the bytes.
    public func read(at offset: UInt64, count: Int, tag: UInt64) throws(VirtioError) {
        try info.checkRange(offset: offset, length: count, transferLimit: false)
        try post(.read, offset: offset, count: count, bytes: nil, tag: tag)
    }

    /// Posts a write of `bytes` at `offset` (copied now).
    public func write(at offset: UInt64, bytes: [UInt8], tag: UInt64) throws(VirtioError) {
        guard !info.readOnly else { throw .readOnly }
        try info.checkRange(offset: offset, length: bytes.count, transferLimit: false)
        try post(.write, offset: offset, count: bytes.count, bytes: bytes, tag: tag)
    }

    /// Posts a flush.
    public func flush(tag: UInt64) throws(VirtioError) {
        guard info.supportsFlush else { throw .unsupported("VIRTIO_BLK_F_FLUSH") }
        try post(.flush, offset: 0, count: 0, bytes: nil, tag: tag)
    }

    /// No more requests: `completions` ends once those posted have completed.
    public func finish() { bookkeeping.finish() }

    func post(_ kind: IOKind, offset: UInt64, count: Int, bytes: [UInt8]?, tag: UInt64) throws(VirtioError) {
        guard bookkeeping.admit() else { throw .invalidRequest("the pipeline was finished") }
        let op = IOOperation<VirtioError>(
            kind: kind, offset: offset, count: count,
            delivery: .stream(tag: tag) { [self] c in bookkeeping.deliver(c) })
        if let bytes { op.fill(from: bytes) }
        guard engine.enqueue(op) else {
            bookkeeping.deliver(IOCompletion(tag: tag, result: .failure(.disconnected("the device is closed"))))
            return
        }
    }
}

/// Queue 0 as the async engine drives it: the `BlockQueue` hot path, unchanged.
final class BlockQueueTransport: IOTransport {
    let queue: BlockQueue
    /// Keeps the rings and bounce pool mapped while requests are in flight, even if the
    /// device object is gone.
    let region: SharedRegion
    let lock: Locked<Int>
    let maxPieceBytes: Int
    /// A completion `wait` returned, for the next `nextCompletion()`.
    var stashed: BlockCompletion?

    init(queue: BlockQueue, region: SharedRegion, lock: Locked<Int>, pieceBytes: Int) {
        self.queue = queue
        self.region = region
        self.lock = lock
        self.maxPieceBytes = pieceBytes
    }

    func post(_ piece: IOPiece, tag: UInt64) throws(VirtioError) -> Bool {
        do throws(VirtioError) {
            switch piece.kind {
            case .read: try queue.postRead(offset: piece.offset, into: piece.buffer, tag: tag)
            case .write: try queue.postWrite(offset: piece.offset, from: UnsafeRawBufferPointer(piece.buffer), tag: tag)
            case .flush: try queue.submitFlush(tag: tag)
            case .identify: try queue.submitGetID(into: piece.buffer, tag: tag)
            }
        } catch .busy {
            return false
        }
        return true
    }

    func publish() { queue.kick() }

    func nextCompletion() -> (tag: UInt64, failure: VirtioError?)? {
        guard let c = stashed ?? queue.poll() else { return nil }
        stashed = nil
        if case .failure(let e) = c.result { return (c.tag, e) }
        return (c.tag, nil)
    }

    var inFlight: Int { queue.inFlight }

    /// Bounded by `pollBound`: with `WaitStrategy.poll` the queue's wait never blocks (so
    /// never sees `wake`); jobs queued on the engine's executor from other threads wait at
    /// most this long. Not while the queue needs settling (a reconnect under way, a broken
    /// or closed device): its wait settles it and acts on the request deadlines there,
    /// which a bounded wait returning early would skip forever.
    func waitForCompletion(orWake wake: Notifier) {
        let limit: Deadline = queue.needsSettling ? .distantFuture : .after(nanoseconds: Self.pollBound)
        stashed = queue.wait(until: limit, orWake: wake)
    }

    static var pollBound: UInt64 { 2_000_000 }

    func exclusively(_ body: () -> Void) { lock.withLock { _ in body() } }

    var closedFailure: VirtioError { .disconnected("the device is closed") }

    var noRoomFailure: VirtioError { .busy }

    func engineStopped() {}

    /// The awaiting callers' threads post and reap between the engine thread's turns.
    var callersMayDrive: Bool { true }

    /// Not while the device broke or a reconnect is under way: settling may block.
    var mayPollInline: Bool { !queue.needsSettling }

    /// The queue's wait strategy's current spin, at most 50 µs on a pool thread.
    var inlineSpinNanoseconds: UInt64 { min(queue.state.pointee.spin.limit, 50_000) }

    func checkDeadlines() { queue.expireOverdue() }
}
