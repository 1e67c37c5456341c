import SharedMemory
import Synchronization

/// What a `VirtioBlockDevice` has served since it was made, counted by the queue threads
/// and read by anyone (an operator's metrics endpoint, a log dump): relaxed atomics, one
/// add per request on the hot path.
public final class BlockDeviceCounters: Sendable {
    let requests = Atomic<Int>(0)
    let bytesRead = Atomic<Int>(0)
    let bytesWritten = Atomic<Int>(0)
    let failed = Atomic<Int>(0)
    /// Rejected chains by rule (the queue goes on; rare, so a lock is fine).
    let violations = Locked<[Rule: Int]>([:])

    public init() {}

    func violation(_ rule: Rule) { violations.withLock { $0[rule, default: 0] += 1 } }

    /// The counts now (each one exact; together not one instant).
    public var snapshot: BlockDeviceStatistics {
        BlockDeviceStatistics(
            requests: requests.load(ordering: .relaxed), bytesRead: bytesRead.load(ordering: .relaxed),
            bytesWritten: bytesWritten.load(ordering: .relaxed), failed: failed.load(ordering: .relaxed),
            violations: violations.withLock { v in
                Dictionary(uniqueKeysWithValues: v.map { ($0.key.rawValue, $0.value) })
            })
    }
}

/// A snapshot of `BlockDeviceCounters`.
public struct BlockDeviceStatistics: Sendable, Codable, Equatable {
    /// Chains completed, malformed ones included.
    public var requests: Int
    /// Bytes the driver read from the image / wrote to it (successful requests).
    public var bytesRead: Int
    public var bytesWritten: Int
    /// Requests completed with a status other than OK (or no status byte).
    public var failed: Int
    /// Rejected chains by rule ("R3": n).
    public var violations: [String: Int]

    public init(
        requests: Int = 0, bytesRead: Int = 0, bytesWritten: Int = 0, failed: Int = 0, violations: [String: Int] = [:]
    ) {
        self.requests = requests
        self.bytesRead = bytesRead
        self.bytesWritten = bytesWritten
        self.failed = failed
        self.violations = violations
    }
}
