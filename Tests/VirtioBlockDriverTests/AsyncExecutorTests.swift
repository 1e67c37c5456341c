import RingTestSupport
import SharedMemory
import Testing
@testable import VirtioBlock

/// Issue 20: the device's I/O thread as a `TaskExecutor` (`VirtioBlockDriver.executor()`),
/// against the real device behind `MisbehavingBlockBackend` (its hold switch: a device that
/// answers nothing until released).
@Suite("the device's executor: tasks on the I/O thread", .serialized)
struct AsyncExecutorTests {
    /// 32 tasks preferring the executor read 50 blocks each: after every `await` the task
    /// runs on the device's thread, every read returns its own block, and no completion is
    /// reaped on a pool thread (the executor's thread posts and reaps them all).
    @Test(.timeLimit(.minutes(5))) func tasksPreferringTheExecutorRunOnTheDeviceThread() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend, timeout: 60)
        defer {
            disk.close()
            backend.stop()
        }
        for i in 0..<64 { try await disk.write(at: UInt64(i) * 4096, bytes: blockPattern(i)) }
        let engine = try disk.engine()
        let executor = try disk.executor()
        #expect(executor === engine.executor)
        #expect(!executor.isCurrent)
        let reapedBefore = engine.reapedByCallers
        let jobsBefore = executor.jobsRun
        let (correct, onThread) = try await withThrowingTaskGroup(of: (Int, Int).self) { group in
            for t in 0..<32 {
                group.addTask(executorPreference: executor) {
                    var ok = 0
                    var on = 0
                    for r in 0..<50 {
                        let i = (t * 7 + r) % 64
                        if try await disk.read(at: UInt64(i) * 4096, count: 4096) == blockPattern(i) { ok += 1 }
                        if executor.isCurrent { on += 1 }
                    }
                    return (ok, on)
                }
            }
            return try await group.reduce((0, 0)) { ($0.0 + $1.0, $0.1 + $1.1) }
        }
        #expect(correct == 32 * 50)
        #expect(onThread == 32 * 50)
        #expect(engine.reapedByCallers == reapedBefore)
        #expect(executor.jobsRun - jobsBefore >= 32 * 50)
        #expect(try await eventually { engine.held == 0 })
        #expect(!disk.isBroken)
    }

    /// An idle device's thread sleeps on its wake eventfd: a job queued from another thread
    /// wakes it and runs there (with the wake-up lost, the task never runs).
    @Test(.timeLimit(.minutes(1))) func anIdleExecutorRunsAJobQueuedFromAnotherThread() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer {
            disk.close()
            backend.stop()
        }
        _ = try await disk.read(at: 0, count: 4096)
        let executor = try disk.executor()
        let ran = SharedCounter()
        for _ in 0..<20 {
            try await Task.sleep(for: .milliseconds(5))  // long enough for the thread to sleep
            Task(executorPreference: executor) { if executor.isCurrent { ran.add() } }
            guard try await eventually(within: 5, { ran.count > 0 }) else {
                Issue.record("a job queued on the idle executor did not run")
                return
            }
            ran.reset()
        }
    }

    /// No starvation: 400 tasks on the executor park reads on a device that holds them all
    /// while a `Task.sleep` ticker on the same executor keeps ticking (the thread runs jobs
    /// queued from elsewhere between its waits on the device, with the queue's adaptive
    /// wait and with `.poll`, whose wait never blocks: it is bounded). Released, every
    /// read returns its own block.
    @Test(.timeLimit(.minutes(5)), arguments: [WaitStrategy.adaptive, .poll])
    func hundredsOfParkedTasksDoNotStarveTheExecutor(wait: WaitStrategy) async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend, timeout: 60, wait: wait)
        defer {
            disk.close()
            backend.stop()
        }
        for i in 0..<64 { try await disk.write(at: UInt64(i) * 4096, bytes: blockPattern(i)) }
        let engine = try disk.engine()
        let executor = try disk.executor()
        backend.holdRequests(true)
        let ticks = SharedCounter()
        let stop = SharedCounter()
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for r in 0..<400 {
                group.addTask(executorPreference: executor) {
                    let i = r % 64
                    return try await disk.read(at: UInt64(i) * 4096, count: 4096) == blockPattern(i)
                }
            }
            #expect(try await eventually(within: 30) { engine.held == 400 })
            let ticker = Task(executorPreference: executor) {
                while stop.count == 0 {
                    try? await Task.sleep(for: .milliseconds(1))
                    if executor.isCurrent { ticks.add() }
                }
            }
            #expect(try await eventually(within: 10) { ticks.count >= 50 })
            #expect(engine.held == 400)  // every read still parked while the ticker ran
            backend.holdRequests(false)
            stop.add()
            await ticker.value
            var correct = 0
            for try await ok in group where ok { correct += 1 }
            #expect(correct == 400)
        }
        #expect(try await eventually { engine.held == 0 })
        #expect(!disk.isBroken)
    }

    /// Shutdown under load: 200 tasks on the executor loop on reads; `close()` while they
    /// run. Every task ends: its next read fails as disconnected, or, for a request the
    /// back-end had when it stopped, by the request deadline (2 s here); a task that prefers
    /// the closed device's executor still runs, on the global executor.
    @Test(.timeLimit(.minutes(2))) func closingWithTasksOnTheExecutorLosesNone() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend, timeout: 2)
        defer { backend.stop() }
        let executor = try disk.executor()
        let reads = SharedCounter()
        let ended = SharedCounter()
        var tasks: [Task<VirtioError?, Never>] = []
        for t in 0..<200 {
            tasks.append(
                Task(executorPreference: executor) {
                    defer { ended.add() }
                    var r = 0
                    while true {
                        do {
                            _ = try await disk.read(at: UInt64((t + r) % 64) * 4096, count: 4096)
                            reads.add()
                            r += 1
                        } catch {
                            return error as? VirtioError
                        }
                    }
                })
        }
        #expect(try await eventually { reads.count >= 2000 })
        disk.close()
        guard try await eventually(within: 20, { ended.count == 200 }) else {
            Issue.record("\(200 - ended.count) tasks on the closed device's executor never ended")
            return
        }
        for task in tasks {
            let error = await task.value
            #expect(error == .disconnected("the device is closed") || error == .timeout(milliseconds: 2000))
        }
        // The tasks can all have ended while the I/O thread still runs (a request the
        // back-end held ends its task at the deadline, and the thread stops only once the
        // engine has nothing in flight): a job enqueued before it stops still runs on it.
        #expect(try await eventually(within: 20) { executor.isClosed })
        let late = await Task(executorPreference: executor) { executor.isCurrent }.value
        #expect(!late)
        #expect(executor.jobsForwarded > 0)
    }
}
