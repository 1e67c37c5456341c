import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// A thread that keeps rewriting one 32-bit word of shared memory, alternating two values,
/// until stopped: the device changing a field while the driver validates it (R2).
final class WordFlipper: @unchecked Sendable {
    let target: UnsafeMutableRawPointer
    let values: (UInt32, UInt32)
    private let flag = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
    private var thread: TestThread?

    init(_ target: UnsafeMutableRawPointer, _ a: UInt32, _ b: UInt32) {
        self.target = target
        self.values = (a, b)
        SharedAccess.store32(flag, 0)
    }

    deinit { flag.deallocate() }

    func start() {
        thread = TestThread { [self] in
            var i: UInt64 = 0
            while SharedAccess.load32(flag) == 0 {
                SharedAccess.store32(target, i & 1 == 0 ? values.0 : values.1)
                i &+= 1
            }
        }
    }

    func stop() {
        SharedAccess.store32(flag, 1)
        thread?.join()
        thread = nil
    }
}

/// The spinning race tests of both sides, one at a time: each has a flipper thread that
/// spins, and the machine has 2 cores.
@Suite(.serialized) enum SpinningRaces {}

extension SpinningRaces {
    /// R2 (single fetch): each used element is loaded once, validated, then used. A device
    /// flipping a field between a valid and an invalid value while the driver polls must
    /// yield either a valid completion or the violation, never an invalid completion.
    @Suite struct DriverSingleFetchTests {
        /// Runs the race on a queue of size 1 (so every request uses slot 0 and head 0) for a
        /// bounded time. Returns the counts of valid completions, expected violations and anything else.
        static func race(
            flipping fieldOffset: Int, good: UInt32, bad: UInt32, writable: Int,
            isExpectedViolation: (Violation) -> Bool, isValid: (Completion) -> Bool
        ) throws -> (valid: Int, violations: Int, wrong: Int) {
            let pair = try RingPair(queueSize: 1, bounceBytesPerQueue: 4096)
            let a = RingAttacker(pair)
            let driver = pair.driver
            let element = a.used + SplitLayout.usedEntryOffset(0)
            let out = try #require(pair.pool.allocate(writable))
            let segment = pair.pool.segment(out, deviceWritable: true)
            // The field the flipper does not touch is set once to its valid value.
            let other = fieldOffset == 0 ? 4 : 0
            let flipper = WordFlipper(element + fieldOffset, good, bad)
            flipper.start()
            defer { flipper.stop() }
            var valid = 0
            var violations = 0
            var wrong = 0
            let deadline = Deadline.after(seconds: 2)
            var i: UInt64 = 0
            while i < 200_000 && !(valid >= 500 && violations >= 500) && !deadline.hasPassed {
                i += 1
                if driver.isBroken {
                    _ = driver.failAll()
                    driver.reset()
                }
                try driver.add([segment], token: i)
                _ = driver.publish()
                SharedAccess.store32(element + other, other == 0 ? 0 : UInt32(writable))
                a.setUsedIndex(driver.lastUsed &+ 1)
                do {
                    if let c = try driver.nextCompletion() {
                        if isValid(c) && c.token == i { valid += 1 } else { wrong += 1 }
                    } else {
                        wrong += 1
                    }
                } catch {
                    if isExpectedViolation(error) { violations += 1 } else { wrong += 1 }
                }
            }
            return (valid, violations, wrong)
        }

        @Test func usedLengthFlippedDuringPollIsNeverAcceptedTooLarge() throws {
            let r = try Self.race(
                flipping: 4, good: 16, bad: 0xFFFF_FFFF, writable: 16,
                isExpectedViolation: { $0 == .usedLengthTooLarge(id: 0, length: 0xFFFF_FFFF, writable: 16) },
                // 0 is what `reset()` leaves in the slot until the flipper's next store.
                isValid: { ($0.length == 16 || $0.length == 0) && $0.head == 0 })
            #expect(r.wrong == 0)
            // Both outcomes must have happened, or the race was not run.
            #expect(r.valid > 0)
            #expect(r.violations > 0)
        }

        @Test func usedIdFlippedDuringPollNeverCompletesAnotherHead() throws {
            let r = try Self.race(
                flipping: 0, good: 0, bad: 0x1_0000, writable: 16,
                isExpectedViolation: { $0 == .usedIdOutOfRange(id: 0x1_0000, queueSize: 1) },
                isValid: { $0.head == 0 && $0.length == 16 })
            #expect(r.wrong == 0)
            #expect(r.valid > 0)
            #expect(r.violations > 0)
        }
    }
}
