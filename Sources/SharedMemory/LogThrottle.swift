/// The one log rate limit for what a peer can repeat at will (refused control messages,
/// rejected chains): the first `burst` events are logged, then only the 2^k-th, so a peer
/// looping on garbage grows the log by O(log n) lines while `count` still says how many.
public struct LogThrottle: Sendable {
    public static let burst: UInt64 = 8
    public private(set) var count: UInt64 = 0

    public init() {}

    /// Counts one event; true when this one should be logged.
    @inline(__always)
    public mutating func admit() -> Bool {
        count &+= 1
        return count <= Self.burst || count & (count &- 1) == 0
    }
}
