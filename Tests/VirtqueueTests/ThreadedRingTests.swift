import Atomics
import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// A driver thread and a device thread on one ring, with eventfd notifications and the
/// spin-then-block pattern on both sides: the in-process concurrency test that CI also
/// runs under ThreadSanitizer (`swift test --sanitize=thread --filter ThreadedRing`).
/// Every hand-off between the threads is an acquire/release pair on a ring index, so a
/// race report here is a real ordering bug.
@Suite(.serialized) struct ThreadedRingTests {
    @Test(arguments: [
        RingFeatures(eventIndex: true, indirectDescriptors: false),
        RingFeatures(eventIndex: false, indirectDescriptors: false),
    ])
    func driverAndDeviceThreadsExchangeEveryPayloadWithoutLostWakeups(features: RingFeatures) throws {
        let pair = try RingPair(queueSize: 32, features: features)
        let kick = try Notifier()
        let call = try Notifier()
        let stop = ManagedAtomic(false)
        let served = ManagedAtomic(0)
        let device = pair.device
        let memory = pair.memory
        nonisolated(unsafe) let deviceQueue = device
        let thread = TestThread {
            var echo = EchoDevice()
            var idle = 0
            while !stop.load(ordering: .acquiring) {
                let n = (try? echo.serve(deviceQueue, memory: memory, budget: 16)) ?? 0
                if n > 0 {
                    served.wrappingIncrement(by: n, ordering: .relaxed)
                    if deviceQueue.publishUsed() { call.signal() }
                    idle = 0
                    continue
                }
                idle += 1
                if idle < 64 { continue }
                if deviceQueue.enableNotifications() { continue }
                _ = kick.wait(until: .after(seconds: 0.05))
            }
        }
        defer {
            stop.store(true, ordering: .releasing)
            kick.signal()
            thread.join()
        }

        let driver = pair.driver
        let pool = pair.pool
        let total = 3000
        let depth = 8
        var slots: [(BounceSlice, BounceSlice, UInt64)] = []
        for i in 0..<depth {
            let payload = (0..<200).map { UInt8(truncatingIfNeeded: $0 * 13 + i) }
            let out = try #require(pool.allocate(payload.count))
            let back = try #require(pool.allocate(payload.count + EchoDevice.checksumSize))
            payload.withUnsafeBytes { pool.copyIn(out, from: $0) }
            slots.append((out, back, payload.withUnsafeBytes { fnv1a($0) }))
        }
        var posted = 0
        var completed = 0
        var answer = [UInt8](repeating: 0, count: 208)
        func post(_ i: Int) throws {
            try driver.add(
                [pool.segment(slots[i].0, deviceWritable: false), pool.segment(slots[i].1, deviceWritable: true)],
                token: UInt64(i))
            posted += 1
        }
        for i in 0..<depth { try post(i) }
        if driver.publish() { kick.signal() }
        let deadline = Deadline.after(seconds: 60)
        while completed < total {
            #expect(!deadline.hasPassed, "stalled after \(completed) completions: lost wake-up?")
            if deadline.hasPassed { return }
            var got = false
            while let c = try driver.nextCompletion() {
                got = true
                let i = Int(c.token)
                let n = answer.withUnsafeMutableBytes {
                    pool.copyOut(slots[i].1, validatedLength: Int(c.length), to: $0)
                }
                #expect(n == 208)
                let sum = (0..<8).reduce(UInt64(0)) { $0 | UInt64(answer[200 + $1]) << (8 * UInt64($1)) }
                #expect(sum == slots[i].2)
                completed += 1
                if posted < total { try post(i) }
            }
            if got {
                if driver.publish() { kick.signal() }
                continue
            }
            if driver.enableInterrupts() { continue }
            // Bounded sleep: a lost wake-up shows as the deadline above, not a hang.
            _ = call.wait(until: .after(seconds: 1))
        }
        #expect(completed == total)
        #expect(served.load(ordering: .relaxed) == total)
        #expect(driver.freeCount == 32)
    }
}
