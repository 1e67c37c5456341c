import CRingFence
import Foundation
import RingTestSupport
import SharedMemory
import Synchronization
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// Issue 13, driver-side forms against serve-blk: a front-end shares its kick, call and
/// err eventfds with the back-end (one open file description), so it can clear O_NONBLOCK
/// and fill or empty the counters at any moment. Whatever it does, the back-end still
/// answers control messages, serves the next front-end, and stops within 5 s.
@Suite(.serialized) struct SharedDescriptorAttackTests {
    typealias F = TestFrontend

    static func makeBlocking(_ n: Notifier) {
        let fd = n.fileDescriptor
        #expect(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) == 0)
    }

    /// Stops the back-end as serve-blk's SIGTERM handler does and checks it returns in 5 s.
    static func expectStopsPromptly(_ fixture: BackendFixture, sourceLocation: SourceLocation = #_sourceLocation) {
        let start = monotonicNanoseconds()
        fixture.shutdown()
        #expect(monotonicNanoseconds() - start < 5_000_000_000, "stop took too long", sourceLocation: sourceLocation)
    }

    /// The queue worker's call write would block forever (pre-fix: GET_VRING_BASE never
    /// answered, the control thread stuck in pthread_join, SIGTERM ignored). Now the
    /// watchdog frees it and that queue fails with `notifierBlocked`.
    @Test func callFDMadeBlockingAndSaturatedFailsOnlyThatQueue() throws {
        let fixture = try BackendFixture()
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.makeBlocking(f.call)
        var full: UInt64 = 0xFFFF_FFFF_FFFF_FFFE
        #expect(write(f.call.fileDescriptor, &full, 8) == 8)
        let header = BlockProtocol.encodeHeader(type: .getID, sector: 0)
        header.withUnsafeBytes { f.pointer(F.headerOffset).copyMemory(from: $0.baseAddress!, byteCount: 16) }
        f.writeDescriptor(
            0, address: F.guest(F.headerOffset), length: 16, flags: SplitLayout.flagNext, next: 2)
        f.writeDescriptor(2, address: F.guest(F.statusOffset), length: 1, flags: SplitLayout.flagWrite)
        f.publish(head: 0)
        #expect(fixture.waitForEvent(containing: "the peer made a write to the shared call eventfd block", seconds: 3))
        // The control plane still answers at once.
        let start = monotonicNanoseconds()
        let base = try VringState.decode(try f.query(.getVringBase, VringState(index: 0, num: 0).encoded))
        #expect(base.num == 1)
        #expect(monotonicNanoseconds() - start < 2_000_000_000)
        try fixture.expectServesWellBehavedFrontend(after: f)
        Self.expectStopsPromptly(fixture)
    }

    /// Pre-fix, the worker's drain read the blocking, emptied kick and never returned. The
    /// race is the scheduler's, so this end-to-end run does not catch that every time;
    /// `SharedEventfdTamperingTests.drainOfAnEmptiedBlockingEventfdReturnsAtOnce` guards
    /// the mechanism deterministically.
    @Test func kickFDMadeBlockingAndEmptiedNeverBlocksTheWorker() throws {
        let fixture = try BackendFixture()
        let f = try TestFrontend(path: fixture.socketPath)
        try f.setUp()
        Self.makeBlocking(f.kick)
        // A thread of ours takes every kick back as soon as it lands: the worker wakes to
        // an empty counter (and finds requests at its idle tick or while spinning).
        let stop = Atomic<Bool>(false)
        let kickFD = f.kick.fileDescriptor
        let eater = TestThread {
            while !stop.load(ordering: .relaxed) {
                var pfd = pollfd(fd: kickFD, events: Int16(POLLIN), revents: 0)
                if poll(&pfd, 1, 20) == 1 { _ = Notifier.drain(descriptor: kickFD) }
            }
        }
        for i in 0..<20 {
            let r = try f.blockRequest(type: .read, sector: UInt64(i), readLength: 512)
            #expect(r.status == 0)
        }
        stop.store(true, ordering: .relaxed)
        eater.join()
        let start = monotonicNanoseconds()
        _ = try f.query(.getVringBase, VringState(index: 0, num: 0).encoded)
        #expect(monotonicNanoseconds() - start < 2_000_000_000)
        try fixture.expectServesWellBehavedFrontend(after: f)
        Self.expectStopsPromptly(fixture)
    }

    /// A pipe (SIGPIPE on write, once its reader is gone) or a memfd (always readable) is
    /// refused as kick, call and err; the session goes on.
    @Test func pipeOrMemfdWhereAnEventfdBelongsIsRefused() throws {
        let fixture = try BackendFixture()
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        var p: [Int32] = [-1, -1]
        #expect(pipe(&p) == 0)
        close(p[0])
        defer { close(p[1]) }
        let memfd = rf_memfd_create("not-an-eventfd", RF_MFD_CLOEXEC)
        defer { close(memfd) }
        for fd in [p[1], memfd] {
            for request in [Request.setVringKick, .setVringCall, .setVringErr] {
                #expect(try f.acked(request, VringFile(index: 0).encoded, fds: [fd]) != 0, "\(request) fd \(fd)")
            }
        }
        #expect(fixture.eventLog().contains { $0.contains("descriptor is a pipe, not a eventfd") })
        #expect(fixture.eventLog().contains { $0.contains("descriptor is a memfd, not a eventfd") })
        try fixture.expectServesWellBehavedFrontend(after: f)
        Self.expectStopsPromptly(fixture)
    }

    /// Issue 13 item 6: a front-end looping on a refused message with NEED_REPLY is
    /// answered every time, counted every time, and logged O(log n) times.
    @Test func refusalsAreCountedAndLoggedRateLimited() throws {
        let fixture = try BackendFixture()
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        let before = fixture.backend.refusals
        for _ in 0..<1000 {
            #expect(try f.acked(.setVringNum, VringState(index: 0, num: 3).encoded) != 0)
        }
        #expect(fixture.backend.refusals - before == 1000)
        let logged = fixture.eventLog().filter { $0.contains("is not a power of two") }
        #expect(logged.count == 8 + 6, "1000 refusals: the first 8, then the 16th, 32nd, ... 512th")
        #expect(logged.last?.contains("refusal 512 on this connection") == true)
        try fixture.expectServesWellBehavedFrontend(after: f)
        Self.expectStopsPromptly(fixture)
    }
}
