public import SharedMemory
public import Virtqueue
public import VhostUser

/// Why a block request (or the device) failed. Device faults are `.violation` and name
/// the rule they broke; everything else is a local refusal or a plain device answer.
public enum VirtioError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The device broke a rule of the ring; the device is broken until reconnected (R6).
    case violation(Violation)
    /// The device broke a rule of virtio-blk or of the vhost-user control protocol; the
    /// device is broken until reconnected (R6).
    case deviceViolation(BlockViolation)
    /// A request did not complete within its deadline; the device is broken (R5).
    case timeout(milliseconds: UInt64)
    /// The device answered IOERR or UNSUPP for this request (the device stays usable).
    case deviceError(BlockProtocol.Status)
    /// The back-end closed the connection (or could not be reached).
    case disconnected(String)
    /// The device did not offer what this request needs (discard, flush, VERSION_1, ...).
    case unsupported(String)
    /// Refused locally: the range is not inside the disk.
    case outOfRange(offset: UInt64, length: UInt64, capacity: UInt64)
    /// Refused locally: the device is read-only.
    case readOnly
    /// Refused locally: misaligned, empty or too large.
    case invalidRequest(String)
    /// No room now (descriptors or bounce memory): complete some requests and retry.
    case busy
    /// A system call failed on our side.
    case system(String)

    /// The device's violation, whichever layer's it is (nil for everything else).
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

    /// One line; device faults start with the rule they broke.
    public var description: String {
        switch self {
        case .violation(let v): return v.description
        case .deviceViolation(let v): return v.description
        case .timeout(let ms):
            return "R5 (bounded work): request did not complete within \(ms) ms; device marked broken"
        case .deviceError(let s):
            return s == .unsupported ? "device answered UNSUPP" : "device answered IOERR"
        case .disconnected(let why): return "back-end disconnected: \(why)"
        case .unsupported(let what): return "device does not support \(what)"
        case .outOfRange(let o, let l, let c):
            return "range \(o)+\(l) is beyond the capacity of \(c) bytes (refused locally)"
        case .readOnly: return "device is read-only (refused locally)"
        case .invalidRequest(let why): return "invalid request: \(why)"
        case .busy: return "queue or bounce pool full"
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
