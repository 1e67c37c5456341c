public import SharedMemory

/// A connected blkif frontend for async code: every call suspends, none blocks a thread.
///
/// ```swift
/// let disk = try AsyncXenBlkFrontend(XenBlkFrontendDevice.connect(channel: channel))
/// try await disk.write(sector: 0, bytes: page)
/// let back = try await disk.read(sector: 0, count: 4096)
/// ```
///
/// Takes over the device: an I/O thread of its own posts the requests, waits on the event
/// channel and resumes the callers; nothing else may use `device` afterwards. Requests
/// larger than one blkif request (11 pages) are cut into several.
///
/// Cancellation: a cancelled task gets `CancellationError` at once. A request the backend
/// already has stays in flight with its bounce pages and landing buffer until the backend
/// answers it, or the device is disabled (timeout or violation, R5/R6; pages the backend
/// still maps stay quarantined, R7): late data never lands in memory another request owns.
public final class AsyncXenBlkFrontend: Sendable {
    /// The disk as the backend announced it (validated).
    public let info: XenBlkInfo
    let engine: IOEngine<XenBlkTransport>

    /// Takes over `device` (connected, no request in flight) and starts its I/O thread.
    public init(_ device: XenBlkFrontendDevice) throws(SystemError) {
        info = device.info
        engine = try IOEngine(transport: XenBlkTransport(device))
    }

    deinit { engine.stop() }

    /// Reads `count` bytes (a multiple of 512) at 512-byte `sector`.
    ///
    /// - Throws: `XenBlkError`, `CancellationError`, or `DeviceClosedError` after `close()`.
    public func read(sector: UInt64, count: Int) async throws -> [UInt8] {
        try check(sector: sector, count: count)
        return try await perform(.read, sector: sector, count: count, bytes: nil)
    }

    /// Writes `bytes` (a multiple of 512, copied before the call suspends) at `sector`.
    /// A cancelled write may still reach the disk.
    public func write(sector: UInt64, bytes: [UInt8]) async throws {
        guard !info.readOnly else { throw XenBlkError.status(.notSupported) }
        try check(sector: sector, count: bytes.count)
        _ = try await perform(.write, sector: sector, count: bytes.count, bytes: bytes)
    }

    /// BLKIF_OP_FLUSH_DISKCACHE.
    public func flush() async throws {
        _ = try await perform(.flush, sector: 0, count: 0, bytes: nil)
    }

    /// Posts requests from async code and delivers their completions as an `AsyncSequence`
    /// (`XenBlkPipeline.completions`), for callers that keep many in flight. Runs on the
    /// same I/O thread as the async calls.
    public func pipeline() -> XenBlkPipeline { XenBlkPipeline(frontend: self) }

    /// Stops taking requests (those queued fail with `DeviceClosedError`); requests in
    /// flight finish or fail by their deadline, then the I/O thread ends and the frontend
    /// disconnects.
    public func close() { engine.stop() }

    func check(sector: UInt64, count: Int) throws(XenBlkError) {
        guard count > 0, count % BlkifLayout.sectorSize == 0 else { throw .submit(.invalidLength(count)) }
        let sectors = UInt64(count / BlkifLayout.sectorSize)
        let (end, overflow) = sector.addingReportingOverflow(sectors)
        guard !overflow, end <= info.sectors else { throw .submit(.beyondCapacity(sector: sector, sectors: sectors)) }
    }

    func perform(_ kind: IOKind, sector: UInt64, count: Int, bytes: [UInt8]?) async throws -> [UInt8] {
        guard
            let result = await engine.run(
                kind, offset: sector &* UInt64(BlkifLayout.sectorSize), count: count, bytes: bytes)
        else { throw CancellationError() }
        switch result {
        case .success(let bytes): return bytes
        case .failure(.device(let e)): throw e
        case .failure(.closed): throw DeviceClosedError()
        }
    }
}

/// Requests posted from async code; their completions come back, tagged, through
/// `completions`, an `AsyncSequence` that ends after `finish()` once every request posted
/// before it has completed.
///
/// ```swift
/// let pipe = disk.pipeline()
/// for i in 0..<32 { try pipe.read(sector: UInt64(i) * 8, count: 4096, tag: UInt64(i)) }
/// pipe.finish()
/// for await c in pipe.completions { use(c.tag, try c.result.get()) }
/// ```
///
/// Posting never blocks nor suspends (requests wait in the engine while the ring is
/// full). Cancellation of the consuming task does not cancel posted requests: each one
/// completes (or fails with the device) and its bounce pages and landing buffer stay the
/// engine's until then.
public final class XenBlkPipeline: Sendable {
    /// One completion: the tag given when posting, and the bytes read (empty for writes
    /// and flushes) or the failure: a `XenBlkError`, or `DeviceClosedError` for a request
    /// still queued when the frontend was closed.
    public typealias Completion = IOCompletion<any Error>

    /// A request posted after `finish()`.
    public struct FinishedError: Error, Sendable, Equatable {}

    /// Completions in the order the backend finished them.
    public let completions: AsyncStream<Completion>
    let bookkeeping = PipelineCompletions<any Error>()
    let frontend: AsyncXenBlkFrontend

    init(frontend: AsyncXenBlkFrontend) {
        completions = bookkeeping.stream
        self.frontend = frontend
    }

    /// Posts a read of `count` bytes (a multiple of 512) at `sector`; the completion
    /// carries the bytes.
    ///
    /// - Throws: `XenBlkError` (refused locally) or `FinishedError`.
    public func read(sector: UInt64, count: Int, tag: UInt64) throws {
        try frontend.check(sector: sector, count: count)
        try post(.read, sector: sector, count: count, bytes: nil, tag: tag)
    }

    /// Posts a write of `bytes` (a multiple of 512, copied now) at `sector`.
    public func write(sector: UInt64, bytes: [UInt8], tag: UInt64) throws {
        guard !frontend.info.readOnly else { throw XenBlkError.status(.notSupported) }
        try frontend.check(sector: sector, count: bytes.count)
        try post(.write, sector: sector, count: bytes.count, bytes: bytes, tag: tag)
    }

    /// Posts BLKIF_OP_FLUSH_DISKCACHE.
    public func flush(tag: UInt64) throws {
        try post(.flush, sector: 0, count: 0, bytes: nil, tag: tag)
    }

    /// No more requests: `completions` ends once those posted have completed.
    public func finish() { bookkeeping.finish() }

    func post(_ kind: IOKind, sector: UInt64, count: Int, bytes: [UInt8]?, tag: UInt64) throws(FinishedError) {
        guard bookkeeping.admit() else { throw FinishedError() }
        let op = IOOperation<XenBlkAsyncFailure>(
            kind: kind, offset: sector &* UInt64(BlkifLayout.sectorSize), count: count,
            delivery: .stream(tag: tag) { [self] c in
                bookkeeping.deliver(
                    Completion(
                        tag: c.tag,
                        result: c.result.mapError { f -> any Error in
                            switch f {
                            case .device(let e): return e
                            case .closed: return DeviceClosedError()
                            }
                        }))
            })
        if let bytes { op.fill(from: bytes) }
        guard frontend.engine.enqueue(op) else {
            bookkeeping.deliver(Completion(tag: tag, result: .failure(DeviceClosedError())))
            return
        }
    }
}

/// Why an engine request failed: the device's answer, or the engine stopped first.
enum XenBlkAsyncFailure: Error, Sendable {
    case device(XenBlkError)
    case closed
}

/// The frontend as the async engine drives it: submit, kick, poll and the event-channel
/// wait of `XenBlkFrontendDevice`, plus a wake eventfd for new work.
final class XenBlkTransport: IOTransport {
    let device: XenBlkFrontendDevice
    /// Tokens `failedTokens` holds that were not yet handed back.
    var failedSeen = 0
    /// The failure of those tokens (the device's first violation).
    var brokenFailure: XenBlkError?
    /// When the current wait for a response began (R5: the device's `timeout` from there,
    /// reset by every response).
    var waitingSince: Deadline?
    /// The last wait woke to an event: the next poll says whether it was productive (R5).
    var woke = false
    let maxPieceBytes = BlkifLayout.maxSegments * SharedRingLayout.pageSize

    init(_ device: XenBlkFrontendDevice) {
        self.device = device
        failedSeen = device.failedTokens.count
    }

    func post(_ piece: IOPiece, tag: UInt64) throws(XenBlkAsyncFailure) -> Bool {
        let sector = piece.offset / UInt64(BlkifLayout.sectorSize)
        do throws(XenBlkError) {
            switch piece.kind {
            case .read: try device.submitRead(sector: sector, into: piece.buffer, token: tag)
            case .write: try device.submitWrite(sector: sector, from: UnsafeRawBufferPointer(piece.buffer), token: tag)
            case .flush: try device.submitFlush(token: tag)
            case .identify: throw .status(.notSupported)
            }
        } catch .submit(.full), .submit(.noBounceSpace) {
            return false
        } catch {
            throw .device(error)
        }
        return true
    }

    func publish() { device.kick() }

    func nextCompletion() -> (tag: UInt64, failure: XenBlkAsyncFailure?)? {
        if let failed = nextFailed() { return failed }
        do throws(XenBlkError) {
            let next = try device.poll()
            if woke {
                device.events.noteWake(productive: next != nil)
                woke = false
            }
            guard let c = next else { return nil }
            waitingSince = nil
            return (c.token, c.status == .okay ? nil : .device(.status(c.status)))
        } catch {
            brokenFailure = error
            return nextFailed()
        }
    }

    /// The next request `failAll` handed back after the device was disabled.
    func nextFailed() -> (tag: UInt64, failure: XenBlkAsyncFailure?)? {
        guard failedSeen < device.failedTokens.count else { return nil }
        let token = device.failedTokens[failedSeen]
        failedSeen += 1
        let failure =
            brokenFailure ?? device.violation.map { .broken($0) } ?? .broken(.deadlineExceeded(milliseconds: 0))
        return (token, .device(failure))
    }

    var inFlight: Int { device.front.inFlightCount + device.failedTokens.count - failedSeen }

    func waitForCompletion(orWake wake: Notifier) {
        if device.front.isBroken || device.front.enableNotifications() { return }
        let deadline = waitingSince ?? .after(seconds: device.timeout)
        waitingSince = deadline
        if deadline.hasPassed {
            brokenFailure = .broken(device.disable(.deadlineExceeded(milliseconds: UInt64(device.timeout * 1000))))
            return
        }
        woke = device.events.wait(until: deadline, orWoken: wake)
    }

    func exclusively(_ body: () -> Void) { body() }

    var closedFailure: XenBlkAsyncFailure { .closed }

    /// Quarantined bounce pages (R7) can leave too few for an 11-page request.
    var noRoomFailure: XenBlkAsyncFailure { .device(.submit(.noBounceSpace)) }

    func engineStopped() { device.disconnect() }
}
