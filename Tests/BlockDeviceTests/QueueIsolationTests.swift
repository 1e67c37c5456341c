import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// Rule R6 (blast radius: one queue), ring life cycle, memory changes while running,
/// notification storms.
@Suite(.serialized) struct QueueIsolationTests {
    typealias F = TestFrontend

    @Test func brokenQueueDoesNotDisturbOtherQueue() throws {
        let fixture = try BackendFixture(queues: 2)
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        try f.setUpQueue(1, size: 8)
        #expect(try f.blockRequest(type: .read, sector: 3, readLength: 512, queue: 1).data.first == 3)
        // Queue 1's avail.idx jumps past the queue size.
        f.publish(head: 0, advance: 100, queue: 1)
        #expect(f.rings[1].err.wait(until: .after(seconds: 3)) > 0)
        #expect(fixture.waitForEvent(containing: "queue 1 failed"))
        // Queue 0 is untouched.
        for sector in UInt64(0)..<20 {
            let r = try f.blockRequest(type: .read, sector: sector, readLength: 512, queue: 0)
            #expect(r.status == 0 && r.data.first == UInt8(sector))
        }
        #expect(f.rings[0].err.drain() == 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func getVringBaseStopsQueueAndReportsIndex() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        for _ in 0..<3 { #expect(try f.blockRequest(type: .flush, sector: 0).status == 0) }
        let base = try VringState.decode(try f.query(.getVringBase, VringState(index: 0, num: 0).encoded))
        #expect(base == VringState(index: 0, num: 3))
        // Stopped: a new request is not served.
        F.prepareFlush(f)
        f.publish(head: 0)
        #expect(f.waitUsed(seconds: 0.3) == nil)
        // Restarted from index 3 (the request above is then picked up).
        #expect(try f.acked(.setVringBase, VringState(index: 0, num: 3).encoded) == 0)
        #expect(try f.acked(.setVringKick, VringFile(index: 0).encoded, fds: [f.kick.fileDescriptor]) == 0)
        f.kick.signal()
        #expect(f.waitUsed()?.length == 1)
        #expect(try f.acked(.setVringBase, VringState(index: 0, num: 0x10000).encoded) != 0, "running ring")
    }

    @Test func memoryAddedWhileRunningKeepsQueueServing() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let extra = try SharedRegion(name: "rf-test-extra", size: 1 << 16)
        let r = MemoryRegionDescription(
            guestAddress: 0x4000_0000, size: 1 << 16, userAddress: 0x7f00_4000_0000, mmapOffset: 0)
        #expect(try f.acked(.addMemReg, SingleMemoryRegion(r).encoded, fds: [extra.fileDescriptor]) == 0)
        // A request whose data lives in the new region.
        F.prepareHeader(f, type: .read, sector: 5)
        f.writeDescriptor(0, address: F.guest(F.headerOffset), length: 16, flags: SplitLayout.flagNext, next: 1)
        f.writeDescriptor(
            1, address: 0x4000_0000, length: 512, flags: SplitLayout.flagNext | SplitLayout.flagWrite, next: 2)
        f.writeDescriptor(2, address: F.guest(F.statusOffset), length: 1, flags: SplitLayout.flagWrite)
        let used = try f.submitRaw()
        #expect(used.length == 513 && f.statusByte == 0)
        #expect(extra.base.load(as: UInt8.self) == 5)
        #expect(try f.acked(.remMemReg, SingleMemoryRegion(r).encoded) == 0)
        #expect(try f.blockRequest(type: .read, sector: 6, readLength: 512).data.first == 6)
    }

    /// Removing the memory a running ring lives in: the removal is done, that ring stops
    /// (err fd, event) instead of touching unmapped memory.
    @Test func removingRingMemoryStopsThatQueue() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let whole = MemoryRegionDescription(
            guestAddress: F.guestBase, size: UInt64(F.regionSize), userAddress: F.userBase, mmapOffset: 0)
        #expect(try f.acked(.remMemReg, SingleMemoryRegion(whole).encoded, fds: [f.region.fileDescriptor]) == 0)
        #expect(f.err.wait(until: .after(seconds: 3)) > 0)
        #expect(fixture.waitForEvent(containing: "not restarted"))
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    /// R5: kicks without work cost the front-end time, not the device its service.
    @Test func notificationStormIsAbsorbed() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let end = Deadline.after(seconds: 0.5)
        var kicks = 0
        while !end.hasPassed {
            f.kick.signal()
            kicks += 1
        }
        let start = monotonicNanoseconds()
        #expect(try f.blockRequest(type: .read, sector: 9, readLength: 512).data.first == 9)
        let ms = (monotonicNanoseconds() - start) / 1_000_000
        print("[storm] \(kicks) kicks in 0.5 s; next request served in \(ms) ms")
        #expect(ms < 1000)
    }

    /// Not a benchmark (that needs the blk driver): a figure for the report, one request
    /// in flight, 4 KiB reads through the whole stack in this process.
    @Test func inProcessReadLatencyFigure() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        let start = monotonicNanoseconds()
        var n = 0
        while monotonicNanoseconds() - start < 1_000_000_000 {
            let r = try f.blockRequest(type: .read, sector: UInt64(n % 1000) * 8, readLength: 4096)
            #expect(r.status == 0)
            n += 1
        }
        print("[figure] in-process 4 KiB reads, depth 1: \(n) IOPS")
        #expect(n > 100)
    }
}

extension TestFrontend {
    static func prepareHeader(_ f: TestFrontend, type: BlockProtocol.RequestType, sector: UInt64) {
        let header = BlockProtocol.encodeHeader(type: type, sector: sector)
        for (i, b) in header.enumerated() { f.pointer(headerOffset + i).storeBytes(of: b, as: UInt8.self) }
    }

    static func prepareFlush(_ f: TestFrontend) {
        prepareHeader(f, type: .flush, sector: 0)
        f.writeDescriptor(0, address: guest(headerOffset), length: 16, flags: SplitLayout.flagNext, next: 2)
        f.writeDescriptor(2, address: guest(statusOffset), length: 1, flags: SplitLayout.flagWrite)
    }
}
