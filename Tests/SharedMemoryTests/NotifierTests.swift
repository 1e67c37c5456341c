import CRingFence
import Glibc
import RingHarness
import SharedMemory
import Testing

/// The eventfd doorbell: never blocks on signal or drain, and every wait has a deadline
/// (R5) that it honours within a bound.
@Suite struct NotifierTests {
    @Test func signalsAccumulateAndDrainResets() throws {
        let n = try Notifier()
        #expect(n.drain() == 0)
        #expect(n.signal() && n.signal() && n.signal())
        #expect(n.drain() == 3)
        #expect(n.drain() == 0)
        #expect(fcntl(n.fileDescriptor, F_GETFL) & O_NONBLOCK != 0)
        #expect(fcntl(n.fileDescriptor, F_GETFD) & FD_CLOEXEC != 0)
    }

    @Test func waitTimesOutWithinBound() throws {
        let n = try Notifier()
        let start = monotonicNanoseconds()
        #expect(n.wait(until: .after(seconds: 0.05)) == 0)
        let elapsed = monotonicNanoseconds() - start
        #expect(elapsed >= 45_000_000)
        #expect(elapsed < 2_000_000_000)
    }

    @Test func waitWithPassedDeadlineReturnsAtOnce() throws {
        let n = try Notifier()
        let start = monotonicNanoseconds()
        #expect(n.wait(until: Deadline(uptimeNanoseconds: 0)) == 0)
        #expect(n.wait(until: .now) == 0)
        #expect(monotonicNanoseconds() - start < 500_000_000)
    }

    @Test func waitReturnsPendingCountWithoutSleeping() throws {
        let n = try Notifier()
        n.signal()
        n.signal()
        let start = monotonicNanoseconds()
        #expect(n.wait(until: .after(seconds: 10)) == 2)
        #expect(monotonicNanoseconds() - start < 1_000_000_000)
        #expect(n.drain() == 0)
    }

    @Test func waitWakesOnSignalFromAnotherThread() throws {
        let n = try Notifier()
        let start = monotonicNanoseconds()
        let peer = TestThread {
            usleep(20_000)
            n.signal()
        }
        defer { peer.join() }
        #expect(n.wait(until: .after(seconds: 10)) == 1)
        let elapsed = monotonicNanoseconds() - start
        #expect(elapsed >= 15_000_000 && elapsed < 5_000_000_000)
    }

    @Test func saturatedCounterStillCountsAsPending() throws {
        let n = try Notifier()
        var big: UInt64 = 0xFFFF_FFFF_FFFF_FFFE  // the eventfd maximum
        #expect(write(n.fileDescriptor, &big, 8) == 8)
        #expect(n.signal() == true)  // EAGAIN: already pending, not an error
        #expect(n.drain() == 0xFFFF_FFFF_FFFF_FFFE)
    }

    @Test func adoptedBlockingEventfdIsMadeNonBlocking() throws {
        // A peer may hand us a blocking eventfd; a blocking read would let it hang us.
        let fd = rf_eventfd(0, RF_EFD_CLOEXEC)
        #expect(fd >= 0)
        #expect(fcntl(fd, F_GETFL) & O_NONBLOCK == 0)
        let n = try Notifier(adopting: fd)
        #expect(fcntl(fd, F_GETFL) & O_NONBLOCK != 0)
        #expect(n.drain() == 0)  // returns instead of blocking
        #expect(n.wait(until: .after(seconds: 0.01)) == 0)
    }

    @Test func adoptingAnInvalidDescriptorThrows() {
        #expect(throws: SystemError("fcntl(O_NONBLOCK)", errno: .badFileDescriptor)) { try Notifier(adopting: -1) }
    }
}

/// Deadlines never overflow and round up, so a wait is never shorter than asked.
@Suite struct DeadlineTests {
    @Test func deadlinesSaturateAndRoundUp() {
        #expect(Deadline.after(nanoseconds: .max).uptimeNanoseconds == .max)
        #expect(Deadline.after(seconds: .infinity).pollTimeoutMilliseconds > 0)
        #expect(Deadline.after(seconds: -5).pollTimeoutMilliseconds == 0)
        #expect(Deadline.after(seconds: .nan).pollTimeoutMilliseconds == 0)
        #expect(Deadline.distantFuture.pollTimeoutMilliseconds == -1)
        #expect(Deadline(uptimeNanoseconds: 0).hasPassed)
        let d = Deadline.after(nanoseconds: 1)  // rounds up to a full millisecond, not 0
        #expect(d.pollTimeoutMilliseconds >= 0 && d.pollTimeoutMilliseconds <= 1)
        #expect(Deadline.after(seconds: 1e12).pollTimeoutMilliseconds == Int32.max)
    }
}
