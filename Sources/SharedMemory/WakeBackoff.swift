/// The one back-off policy for wake-ups that bring no work (R5): after `threshold`
/// spurious wake-ups in a row, each further one is followed by a pause that doubles from
/// `firstPause` up to `maximumPause` (XSA-391's "lateeoi" throttling), so a storm costs the
/// peer time instead of costing us a CPU. A productive wake-up resets it.
public struct WakeBackoff: Sendable {
    public static let threshold: UInt64 = 16
    public static let firstPauseNanoseconds: UInt64 = 50_000
    public static let maximumPauseNanoseconds: UInt64 = 10_000_000

    /// Spurious wake-ups seen in all.
    public private(set) var spuriousTotal: UInt64 = 0
    /// Spurious wake-ups since the last productive one.
    public private(set) var consecutive: UInt64 = 0
    /// The pause before the next wait (0 while wake-ups bring work).
    public private(set) var pauseNanoseconds: UInt64 = 0
    /// The longest pause applied so far (observability for storms).
    public private(set) var longestPauseNanoseconds: UInt64 = 0

    public init() {}

    /// Records whether the last wake-up found work.
    @inline(__always)
    public mutating func note(productive: Bool) {
        if productive {
            if consecutive != 0 {
                consecutive = 0
                pauseNanoseconds = 0
            }
            return
        }
        spuriousTotal &+= 1
        consecutive &+= 1
        if consecutive > Self.threshold {
            pauseNanoseconds = min(max(pauseNanoseconds &* 2, Self.firstPauseNanoseconds), Self.maximumPauseNanoseconds)
            longestPauseNanoseconds = max(longestPauseNanoseconds, pauseNanoseconds)
        }
    }

    /// The most wake-ups without work the policy lets through in `seconds`: `threshold`
    /// free ones, the doubling pauses up to the maximum, then one per maximum pause. What a
    /// storm can cost, as a bound tests and monitors can check.
    public static func mostSpuriousWakeUps(in seconds: Double) -> Int {
        var pause = firstPauseNanoseconds
        var ramp = 1
        while pause < maximumPauseNanoseconds {
            pause *= 2
            ramp += 1
        }
        return Int(threshold) + ramp + Int(max(0, seconds) * 1e9 / Double(maximumPauseNanoseconds)) + 1
    }

    /// Sleeps for the current pause, but not past `deadline`.
    public func pause(until deadline: Deadline = .distantFuture) {
        guard pauseNanoseconds > 0 else { return }
        let now = monotonicNanoseconds()
        guard deadline.uptimeNanoseconds > now else { return }
        sleepNanoseconds(min(pauseNanoseconds, deadline.uptimeNanoseconds - now))
    }
}
