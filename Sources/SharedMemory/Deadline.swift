#if canImport(Glibc)
import Glibc
#endif

/// A point on the monotonic clock. Every wait in RingFence has one (rule R5).
public struct Deadline: Comparable, Sendable, CustomStringConvertible {
    /// Nanoseconds on CLOCK_MONOTONIC.
    public let uptimeNanoseconds: UInt64

    public init(uptimeNanoseconds: UInt64) { self.uptimeNanoseconds = uptimeNanoseconds }

    public static var now: Deadline { Deadline(uptimeNanoseconds: monotonicNanoseconds()) }

    /// `now + seconds`, saturating.
    public static func after(seconds: Double) -> Deadline {
        let clamped = max(0, min(seconds, 1e9))
        let (sum, overflow) = monotonicNanoseconds().addingReportingOverflow(UInt64(clamped * 1e9))
        return Deadline(uptimeNanoseconds: overflow ? .max : sum)
    }

    public static func after(nanoseconds: UInt64) -> Deadline {
        let (sum, overflow) = monotonicNanoseconds().addingReportingOverflow(nanoseconds)
        return Deadline(uptimeNanoseconds: overflow ? .max : sum)
    }

    public static let distantFuture = Deadline(uptimeNanoseconds: .max)

    public var hasPassed: Bool { Deadline.now >= self }

    /// Remaining time in milliseconds for poll(2), rounded up, clamped to Int32.
    public var pollTimeoutMilliseconds: Int32 {
        if self == .distantFuture { return -1 }
        let now = monotonicNanoseconds()
        if now >= uptimeNanoseconds { return 0 }
        let ms = (uptimeNanoseconds - now + 999_999) / 1_000_000
        return Int32(clamping: ms)
    }

    public static func < (a: Deadline, b: Deadline) -> Bool {
        a.uptimeNanoseconds < b.uptimeNanoseconds
    }

    public var description: String { "Deadline(+\(pollTimeoutMilliseconds) ms)" }
}

@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// CLOCK_MONOTONIC as of a recent timer tick: the same time base as
/// `monotonicNanoseconds()`, never ahead of it. Costs a few loads where a precise read
/// (tens of nanoseconds on this VM, where the vDSO reads a paravirtual clock) is one of the
/// dearest things on a per-request path. Stamping deadlines with it, add
/// `coarseClockSlack` so they do not come early.
@inline(__always)
public func coarseMonotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// The coarse clock's tick length (clock_getres), at least 1 ms.
public let coarseClockResolution: UInt64 = {
    var ts = timespec()
    guard clock_getres(CLOCK_MONOTONIC_COARSE, &ts) == 0 else { return 10_000_000 }
    return max(1_000_000, UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec))
}()

/// What to add to a deadline stamped with the coarse clock. Its lag is not bounded by one
/// tick: measured here (HZ=250, 4 ms ticks) it was 3-7.5 ms over 48 million reads, so
/// four ticks. A deadline is then at most that much late, never early.
public let coarseClockSlack: UInt64 = 4 * coarseClockResolution
