import RingTestSupport
import SharedMemory
import Testing
@testable import VirtioBlock

/// Block `i`'s 4 KiB pattern.
func blockPattern(_ i: Int) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ i &* 7 &+ 1) } }

/// Polls `condition` every millisecond until it holds or `seconds` pass.
func eventually(within seconds: Double = 5, _ condition: () throws -> Bool) async throws -> Bool {
    let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < end {
        if try condition() { return true }
        try await Task.sleep(for: .milliseconds(1))
    }
    return try condition()
}

/// The async calls against the real device (`VirtioBlockDevice` behind the real `Backend`,
/// in `MisbehavingBlockBackend` only for its hold switch: a device that completes late).
@Suite("async calls suspend; cancellation is safe", .serialized)
struct AsyncCallTests {
    /// Issue 20: 400 awaiting reads on a device that answers nothing hold no pool thread:
    /// the pool still runs a ticker while all 400 are parked (with reads that block, the
    /// ticker and the reads would wait for the request deadline). Released, every read
    /// returns its own block. Ordering, not timing: other suites share the pool.
    @Test(.timeLimit(.minutes(5))) func awaitingReadsOnASilentDeviceDoNotStarveThePool() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend, timeout: 60)
        defer {
            disk.close()
            backend.stop()
        }
        for i in 0..<64 { try await disk.write(at: UInt64(i) * 4096, bytes: blockPattern(i)) }
        let engine = try disk.engine()
        backend.holdRequests(true)
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for r in 0..<400 {
                group.addTask {
                    let i = r % 64
                    return try await disk.read(at: UInt64(i) * 4096, count: 4096) == blockPattern(i)
                }
            }
            #expect(try await eventually(within: 30) { engine.held == 400 })
            for _ in 0..<5 { try await Task.sleep(for: .milliseconds(1)) }
            #expect(engine.held == 400)  // the ticker ran while every read was parked
            backend.holdRequests(false)
            var correct = 0
            for try await ok in group where ok { correct += 1 }
            #expect(correct == 400)
        }
        #expect(engine.held == 0)
        #expect(!disk.isBroken)
    }

    /// The awaiting callers drive the queue themselves: 32 concurrent readers' completions
    /// are reaped (and their owners resumed) on the callers' own threads, not only by the
    /// engine thread, and every read returns its own block.
    @Test(.timeLimit(.minutes(5))) func awaitingCallersReapCompletionsOnTheirOwnThreads() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend, timeout: 60)
        defer {
            disk.close()
            backend.stop()
        }
        for i in 0..<64 { try await disk.write(at: UInt64(i) * 4096, bytes: blockPattern(i)) }
        let engine = try disk.engine()
        let before = engine.reapedByCallers
        let correct = try await withThrowingTaskGroup(of: Int.self) { group in
            for t in 0..<32 {
                group.addTask {
                    var ok = 0
                    for r in 0..<50 {
                        let i = (t * 7 + r) % 64
                        if try await disk.read(at: UInt64(i) * 4096, count: 4096) == blockPattern(i) { ok += 1 }
                    }
                    return ok
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(correct == 32 * 50)
        #expect(engine.reapedByCallers > before)
        #expect(try await eventually { engine.held == 0 })
        #expect(!disk.isBroken)
    }

    /// Every request type through the async calls, and a read larger than one request.
    @Test func asyncCallsServeEveryRequestType() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer {
            disk.close()
            backend.stop()
        }
        let data = (0..<(300 << 10)).map { UInt8(truncatingIfNeeded: $0 ^ ($0 >> 9)) }
        try await disk.write(at: 8192, bytes: data)
        #expect(try await disk.read(at: 8192, count: data.count) == data)
        try await disk.flush()
        #expect(try await disk.identify() == "misbehaving-blk")
        // Refused locally, as the synchronous calls refuse them.
        await #expect(throws: VirtioError.outOfRange(offset: 1 << 20, length: 4096, capacity: 1 << 20)) {
            try await disk.read(at: 1 << 20, count: 4096)
        }
        // Synchronous convenience calls share queue 0 with the engine.
        let syncRead = { () throws(VirtioError) -> [UInt8] in try disk.read(at: 8192, count: 4096) }
        #expect(try syncRead() == Array(data.prefix(4096)))
    }

    /// Cancellation rule: the cancelled caller gets `CancellationError` at once; the request
    /// the device holds keeps its memory (bounce slice and landing buffer) until the device
    /// completes it late, and the device stays healthy.
    @Test(.timeLimit(.minutes(5))) func cancelledReadReturnsAtOnceAndKeepsItsMemoryUntilTheLateCompletion()
        async throws
    {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend, timeout: 10)
        defer {
            disk.close()
            backend.stop()
        }
        try await disk.write(at: 0, bytes: blockPattern(1))
        try await disk.write(at: 4096, bytes: blockPattern(2))
        let engine = try disk.engine()
        backend.holdRequests(true)
        let postedBefore = engine.posted
        let task = Task { try await disk.read(at: 0, count: 4096) }
        #expect(try await eventually { engine.held == 1 && engine.posted == postedBefore + 1 })  // on the ring
        task.cancel()
        // Prompt: before the device answers (it holds the request) or its deadline (10 s).
        let result = await task.result
        #expect(throws: CancellationError.self) { try result.get() }
        // The device still holds the request: its memory is not released.
        try await Task.sleep(for: .milliseconds(100))
        #expect(engine.held == 1)
        backend.holdRequests(false)
        #expect(try await disk.read(at: 4096, count: 4096) == blockPattern(2))
        #expect(try await eventually { engine.held == 0 })
        #expect(!disk.isBroken)
        #expect(try await disk.read(at: 0, count: 4096) == blockPattern(1))
    }

    /// A cancelled request the device never completes: its memory stays held until the
    /// request deadline breaks the device (R5, R6), then is released with the failure.
    @Test(.timeLimit(.minutes(5))) func cancelledReadTheDeviceNeverCompletesIsReleasedWhenTheDeviceBreaks()
        async throws
    {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend, timeout: 3)
        defer {
            disk.close()
            backend.stop()
        }
        let engine = try disk.engine()
        backend.holdRequests(true)
        let postedBefore = engine.posted
        let task = Task { try await disk.read(at: 0, count: 4096) }
        // On the ring, not merely queued (a queued request that is cancelled is never posted).
        #expect(try await eventually { engine.held == 1 && engine.posted == postedBefore + 1 })
        task.cancel()
        let result = await task.result
        #expect(throws: CancellationError.self) { try result.get() }
        #expect(engine.held == 1)
        #expect(try await eventually { engine.held == 0 })
        #expect(disk.isBroken)
        #expect(disk.failure == .timeout(milliseconds: 3000))
        await #expect(throws: VirtioError.timeout(milliseconds: 3000)) { try await disk.read(at: 0, count: 4096) }
    }

    /// A task cancelled before the call: `CancellationError`, nothing reaches the device.
    @Test func alreadyCancelledTaskPostsNothing() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer {
            disk.close()
            backend.stop()
        }
        let engine = try disk.engine()
        let served = backend.report.requestsServed
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await disk.read(at: 0, count: 4096)
        }
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(engine.held == 0)
        #expect(backend.report.requestsServed == served)
    }

    /// Completions as an `AsyncSequence`: every posted request comes back once, tagged.
    @Test func pipelineDeliversEveryCompletionTagged() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer {
            disk.close()
            backend.stop()
        }
        for i in 0..<64 { try await disk.write(at: UInt64(i) * 4096, bytes: blockPattern(i)) }
        let pipe = try disk.pipeline()
        for i in 0..<200 { try pipe.read(at: UInt64(i % 64) * 4096, count: 4096, tag: UInt64(i)) }
        try pipe.write(at: 64 * 4096, bytes: blockPattern(64), tag: 1000)
        try pipe.flush(tag: 1001)
        pipe.finish()
        #expect(throws: VirtioError.invalidRequest("the pipeline was finished")) {
            try pipe.flush(tag: 1002)
        }
        var tags: Set<UInt64> = []
        for await c in pipe.completions {
            tags.insert(c.tag)
            let bytes = try c.result.get()
            if c.tag < 200 { #expect(bytes == blockPattern(Int(c.tag % 64))) } else { #expect(bytes.isEmpty) }
        }
        #expect(tags == Set((0..<200).map(UInt64.init) + [1000, 1001]))
        #expect(try await disk.read(at: 64 * 4096, count: 4096) == blockPattern(64))
    }

    /// After `close()`, async calls fail as disconnected instead of waiting.
    @Test func asyncCallAfterCloseFailsAtOnce() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer { backend.stop() }
        _ = try await disk.read(at: 0, count: 512)
        disk.close()
        await #expect(throws: VirtioError.disconnected("the device is closed")) {
            try await disk.read(at: 0, count: 512)
        }
    }
}
