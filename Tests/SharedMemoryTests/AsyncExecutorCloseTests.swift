import RingTestSupport
import Testing

@testable import SharedMemory

/// Issue 20: a `DeviceExecutor` whose thread ends with jobs still queued loses none.
@Suite("device executor: shutdown with jobs pending", .serialized)
struct AsyncExecutorCloseTests {
    /// 300 tasks prefer an executor whose thread never runs them; the thread ends
    /// (`close()`): every one of them runs, on the global concurrent executor, and so does
    /// a task started afterwards. (With the pending jobs dropped instead, none runs.)
    @Test(.timeLimit(.minutes(1))) func closingHandsEveryPendingJobToTheGlobalExecutor() async throws {
        let executor = DeviceExecutor(wake: try Notifier())
        let ran = SharedCounter()
        let onThread = SharedCounter()
        for _ in 0..<300 {
            Task(executorPreference: executor) {
                if executor.isCurrent { onThread.add() }
                ran.add()
            }
        }
        try await Task.sleep(for: .milliseconds(20))
        #expect(ran.count == 0)  // queued: no thread runs this executor yet
        let thread = try spawnThread {
            executor.attach()
            executor.close()
        }
        thread.join()
        let end = ContinuousClock.now + .seconds(10)
        while ran.count < 300 && ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(1)) }
        #expect(ran.count == 300)
        #expect(onThread.count == 0)
        #expect(executor.jobsForwarded >= 300)
        #expect(executor.jobsRun == 0)
        let late = SharedCounter()
        Task(executorPreference: executor) { late.add() }
        while late.count == 0 && ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(1)) }
        #expect(late.count == 1)
    }
}
