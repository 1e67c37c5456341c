/// How a ring's waiting side (a driver reaping completions, a device waiting for requests)
/// spends the time until the peer's next move (issue 19). Every choice keeps every
/// deadline (R5): only the cost of waiting changes.
public enum WaitStrategy: Sendable, Equatable, CustomStringConvertible {
    /// Never block: poll the ring until work arrives. The lowest latency (what SPDK and
    /// DPDK users expect), one CPU fully busy while waiting.
    case poll
    /// Poll for this long after the last work, then block on the eventfd.
    case spin(nanoseconds: UInt64)
    /// Poll for a time that adapts, then block (the default, as QEMU's adaptive polling):
    /// the spin doubles when a block ended soon after it began (a longer spin would have
    /// caught the work) and halves when blocks are long (the spin was wasted), within
    /// `AdaptiveSpin.minimum...maximum`. Idle costs next to no CPU.
    case adaptive

    /// Block at once (`spin(nanoseconds: 0)`): interrupts only.
    public static let interrupts = WaitStrategy.spin(nanoseconds: 0)

    public var description: String {
        switch self {
        case .poll: return "poll"
        case .spin(let ns): return ns == 0 ? "interrupts" : "spin \(ns / 1000) us"
        case .adaptive: return "adaptive"
        }
    }
}

/// The spin length a `WaitStrategy` gives, and how `.adaptive` moves it.
public struct AdaptiveSpin: Sendable {
    public static let minimum: UInt64 = 4_000
    public static let initial: UInt64 = 20_000
    /// Two cores here: never spin for long.
    public static let maximum: UInt64 = 100_000

    public let strategy: WaitStrategy
    /// How long to poll before blocking now (UInt64.max for `.poll`).
    public private(set) var limit: UInt64

    public init(_ strategy: WaitStrategy) {
        self.strategy = strategy
        switch strategy {
        case .poll: limit = .max
        case .spin(let ns): limit = ns
        case .adaptive: limit = Self.initial
        }
    }

    /// After a block of `blocked` nanoseconds that ended with work (`productive`) or not.
    public mutating func noteBlock(nanoseconds blocked: UInt64, productive: Bool) {
        guard strategy == .adaptive else { return }
        if productive && blocked < Self.maximum {
            limit = min(Self.maximum, max(limit &* 2, Self.minimum))
        } else {
            limit = max(Self.minimum, limit / 2)
        }
    }
}
