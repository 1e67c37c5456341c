import Adversary
import SharedMemory
import Testing
@testable import XenRing

/// `AsyncXenBlkFrontend` against the real backend (`XenBlkBackendConnection` on a thread,
/// over a socketpair with real eventfds and memfds), and against one that never answers.
@Suite("async Xen blk frontend", .serialized)
struct AsyncXenTests {
    /// 300 concurrent awaiting reads (pieces of 4 KiB and of more than one blkif request)
    /// all complete with their own data.
    @Test(.timeLimit(.minutes(5))) func concurrentAwaitingReadsReturnTheirOwnBlocks() async throws {
        // Generous idle and request bounds: in a full run, blocking suites can hold the
        // whole cooperative pool for seconds before these tasks get to submit.
        let (device, backend) = try connectedPair(sectors: 4096, idleTimeout: 120)
        device.timeout = 120
        let disk = try AsyncXenBlkFrontend(device)
        for i in 0..<64 { try await disk.write(sector: UInt64(i) * 8, bytes: page(UInt8(i))) }
        let big = (0..<(100 << 10)).map { UInt8(truncatingIfNeeded: $0 ^ ($0 >> 10)) }
        try await disk.write(sector: 1024, bytes: big)
        try await disk.flush()
        let correct = try await withThrowingTaskGroup(of: Bool.self) { group in
            for r in 0..<300 {
                group.addTask {
                    if r % 50 == 0 { return try await disk.read(sector: 1024, count: big.count) == big }
                    let i = r % 64
                    return try await disk.read(sector: UInt64(i) * 8, count: 4096) == page(UInt8(i))
                }
            }
            var correct = 0
            for try await ok in group where ok { correct += 1 }
            return correct
        }
        #expect(correct == 300)
        await #expect(throws: XenBlkError.submit(.beyondCapacity(sector: 4096, sectors: 8))) {
            try await disk.read(sector: 4096, count: 4096)
        }
        await #expect(throws: XenBlkError.submit(.invalidLength(100))) { try await disk.read(sector: 0, count: 100) }
        disk.close()
        await #expect(throws: DeviceClosedError()) { try await disk.read(sector: 0, count: 4096) }
        backend.join()
    }

    /// A backend that never answers: 100 awaiting reads hold no pool thread (a ticker keeps
    /// running while all are parked), a cancelled one returns at once (before the device's
    /// deadline) while its request stays held, and at the deadline the device is disabled
    /// (R5, R6) and every request fails with it. Ordering, not timing: other suites share
    /// the pool.
    @Test(.timeLimit(.minutes(5))) func silentBackendStarvesNothingAndCancellationIsPrompt() async throws {
        let (device, backend) = try connectedPair(attack: .neverRespond, idleTimeout: 120)
        device.timeout = 60
        let disk = try AsyncXenBlkFrontend(device)
        let v = XenViolation.deadlineExceeded(milliseconds: 60000)
        let postedBefore = disk.engine.posted
        let cancelled = Task { try await disk.read(sector: 0, count: 4096) }
        // On the ring before the others come (a cancelled request still queued behind a
        // full ring is never posted, and then nothing holds its memory).
        #expect(try await eventually(within: 55) { disk.engine.held == 1 && disk.engine.posted == postedBefore + 1 })
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for r in 0..<100 {
                group.addTask {
                    do {
                        _ = try await disk.read(sector: UInt64(r % 16) * 8, count: 4096)
                        return false
                    } catch let e as XenBlkError {
                        return e == .broken(v)
                    }
                }
            }
            #expect(try await eventually(within: 55) { disk.engine.held == 101 })
            cancelled.cancel()
            let result = await cancelled.result
            #expect(throws: CancellationError.self) { try result.get() }
            for _ in 0..<5 { try await Task.sleep(for: .milliseconds(1)) }
            #expect(disk.engine.held == 101)  // the cancelled request's memory is still held
            var failedSo = 0
            for try await ok in group where ok { failedSo += 1 }
            #expect(failedSo == 100)
        }
        #expect(try await eventually { disk.engine.held == 0 })
        await #expect(throws: XenBlkError.broken(v)) { try await disk.flush() }
        disk.close()
        backend.join()
    }

    /// The pipeline: 64 reads, writes and a flush posted without awaiting, every
    /// completion delivered once through `completions` with its own tag and bytes; the
    /// sequence ends after `finish()`; a post after it is refused; a pipeline on a closed
    /// frontend delivers `DeviceClosedError`.
    @Test(.timeLimit(.minutes(5))) func pipelineDeliversEveryCompletionOnceAsASequence() async throws {
        let (device, backend) = try connectedPair(sectors: 4096, idleTimeout: 120)
        device.timeout = 120
        let disk = try AsyncXenBlkFrontend(device)
        let writes = disk.pipeline()
        for i in 0..<32 { try writes.write(sector: UInt64(i) * 8, bytes: page(UInt8(i)), tag: UInt64(1000 + i)) }
        try writes.flush(tag: 2000)
        writes.finish()
        var written = Set<UInt64>()
        for await c in writes.completions {
            #expect(try c.result.get().isEmpty)
            #expect(written.insert(c.tag).inserted)
        }
        #expect(written == Set((0..<32).map { UInt64(1000 + $0) } + [2000]))
        let reads = disk.pipeline()
        for i in 0..<64 { try reads.read(sector: UInt64(i % 32) * 8, count: 4096, tag: UInt64(i)) }
        reads.finish()
        #expect(throws: XenBlkPipeline.FinishedError()) { try reads.flush(tag: 99) }
        var seen = Set<UInt64>()
        for await c in reads.completions {
            #expect(try c.result.get() == page(UInt8(c.tag % 32)))
            #expect(seen.insert(c.tag).inserted)
        }
        #expect(seen == Set(0..<64))
        #expect(disk.engine.held == 0)
        disk.close()
        let late = disk.pipeline()
        try late.read(sector: 0, count: 4096, tag: 7)
        late.finish()
        var closed = 0
        for await c in late.completions {
            #expect(c.tag == 7)
            #expect(throws: DeviceClosedError.self) { try c.result.get() }
            closed += 1
        }
        #expect(closed == 1)
        backend.join()
    }
}

/// Polls `condition` every millisecond until it holds or `seconds` pass.
func eventually(within seconds: Double = 5, _ condition: () throws -> Bool) async throws -> Bool {
    let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < end {
        if try condition() { return true }
        try await Task.sleep(for: .milliseconds(1))
    }
    return try condition()
}
