public import SharedMemory
public import Virtqueue
public import VhostUser

/// Why a net operation (or the device) failed. Device faults are `.violation`,
/// `.deviceViolation` and `.timeout` and name the rule they broke; everything else is a
/// local refusal or a plain device answer.
public enum NetError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The device broke a rule of the ring; the device is broken (R6).
    case violation(Violation)
    /// The device broke a rule of virtio-net or of the vhost-user control protocol (R6).
    case deviceViolation(NetViolation)
    /// A control command or the device did not answer within its deadline (R5).
    case timeout(milliseconds: UInt64)
    /// The device answered a control command with VIRTIO_NET_ERR (the device stays usable).
    case commandRefused(String)
    /// The back-end closed the connection (or could not be reached).
    case disconnected(String)
    /// The device did not offer what this needs (control queue, MQ, ...).
    case unsupported(String)
    /// Refused locally: a frame too short or too long, a bad argument.
    case invalidRequest(String)
    /// A system call failed on our side.
    case system(String)

    public var violationCause: (any RuleViolation)? {
        switch self {
        case .violation(let v): return v
        case .deviceViolation(let v): return v
        default: return nil
        }
    }

    /// The rule a device fault broke (nil for local refusals and plain device answers).
    public var rule: Rule? {
        switch self {
        case .violation(let v): return v.rule
        case .deviceViolation(let v): return v.rule
        case .timeout: return .r5
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case .violation(let v): return v.description
        case .deviceViolation(let v): return v.description
        case .timeout(let ms):
            return "R5 (bounded work): the device did not answer within \(ms) ms; device marked broken"
        case .commandRefused(let what): return "device answered VIRTIO_NET_ERR to \(what)"
        case .disconnected(let why): return "back-end disconnected: \(why)"
        case .unsupported(let what): return "device does not support \(what)"
        case .invalidRequest(let why): return "invalid request: \(why)"
        case .system(let s): return s
        }
    }

    /// Maps a control-plane failure: a dead peer is `.disconnected`, a missing feature
    /// `.unsupported`, anything malformed a `controlProtocol` violation (R3).
    public init(_ error: VhostUserError, replyTimeoutMilliseconds: UInt64 = 0) {
        switch error {
        case .channel(.closed): self = .disconnected("back-end closed the vhost-user socket")
        case .channel(.timedOut): self = .timeout(milliseconds: replyTimeoutMilliseconds)
        case .channel(.system(let e)): self = .disconnected(e.description)
        case .channel(.pathTooLong(let p)): self = .invalidRequest("socket path too long: \(p)")
        case .unsupported(let what): self = .unsupported(what)
        default: self = .deviceViolation(.controlProtocol(error.description))
        }
    }
}
