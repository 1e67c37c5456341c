/// The small core every layer's errors share: each module owns its own violation cases
/// (the ring's `Violation`, virtio-blk's `BlockViolation`, Xen's, ...) and says through
/// this protocol which rule each one enforces.
/// The rules of docs/design.md §2. Every violation, in every module, names the one it enforces.
public enum Rule: String, Sendable, CaseIterable {
    case r1 = "R1"
    case r2 = "R2"
    case r3 = "R3"
    case r4 = "R4"
    case r5 = "R5"
    case r6 = "R6"
    case r7 = "R7"
    case r8 = "R8"

    public var title: String {
        switch self {
        case .r1: return "write-only sharing"
        case .r2: return "single fetch"
        case .r3: return "validate before use"
        case .r4: return "no trap on foreign data"
        case .r5: return "bounded work"
        case .r6: return "fail closed, per device"
        case .r7: return "share only what must be shared"
        case .r8: return "one mode"
        }
    }
}

/// Something a peer did that a rule forbids, as one module's typed error.
public protocol RuleViolation: Error, Sendable, CustomStringConvertible {
    /// The rule the failed check enforces.
    var rule: Rule { get }
    /// The check that failed, without the rule prefix.
    var detail: String { get }
}

extension RuleViolation {
    public var description: String { "\(rule.rawValue) (\(rule.title)): \(detail)" }
}
