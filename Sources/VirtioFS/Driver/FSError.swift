public import SharedMemory
public import Virtqueue
public import VhostUser

/// Why a file-system call failed. Device faults name the rule they broke and break the
/// driver (R6); a plain errno answer leaves it usable; the rest are local refusals.
public enum FSError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The device broke a rule of the ring.
    case violation(Violation)
    /// The device broke a rule of FUSE / virtio-fs or of the vhost-user control protocol.
    case deviceViolation(FSViolation)
    /// A request did not complete within its deadline; the driver is broken (R5).
    case timeout(milliseconds: UInt64)
    /// The device answered with this errno (ENOENT, EEXIST, ...); the driver stays usable.
    case errno(Int32)
    /// The back-end closed the connection (or could not be reached).
    case disconnected(String)
    /// The device did not offer what this needs.
    case unsupported(String)
    /// Refused locally: a bad name, path, size or handle.
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
            return "R5 (bounded work): request did not complete within \(ms) ms; driver marked broken"
        case .errno(let e): return "device answered \(FSError.errnoName(e))"
        case .disconnected(let why): return "back-end disconnected: \(why)"
        case .unsupported(let what): return "device does not support \(what)"
        case .invalidRequest(let why): return "invalid request: \(why)"
        case .system(let s): return s
        }
    }

    /// A short name for the errno values a file system answers most.
    public static func errnoName(_ e: Int32) -> String {
        let names: [Int32: String] = [
            1: "EPERM", 2: "ENOENT", 5: "EIO", 9: "EBADF", 12: "ENOMEM", 13: "EACCES", 17: "EEXIST",
            18: "EXDEV", 20: "ENOTDIR", 21: "EISDIR", 22: "EINVAL", 23: "ENFILE", 27: "EFBIG", 28: "ENOSPC",
            30: "EROFS", 36: "ENAMETOOLONG", 38: "ENOSYS", 39: "ENOTEMPTY", 40: "ELOOP", 95: "EOPNOTSUPP",
        ]
        return (names[e] ?? "errno") + " (\(e))"
    }

    /// Maps a control-plane failure as `VirtioError` does for blk.
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
