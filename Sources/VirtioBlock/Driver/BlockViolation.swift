public import SharedMemory

/// What a virtio-blk back-end did wrong above the ring (the ring's own checks are
/// `Violation`'s). The first one breaks the device (R6).
public enum BlockViolation: RuleViolation, Equatable {
    /// The status byte is not 0, 1 or 2 (includes the 0xff sentinel a device never wrote).
    case blockStatusInvalid(status: UInt8)
    /// The device reported a used length of 0: it wrote neither data nor the status byte.
    case blockStatusMissing(id: UInt32)
    /// A read claimed success but reported fewer bytes than requested.
    case blockShortRead(expected: UInt64, got: UInt64)
    /// A config field the driver cannot clamp into a sane value (capacity, blk_size).
    case blockConfigInvalid(field: String, value: UInt64)
    /// The vhost-user back-end broke the control protocol (bad reply, wrong size, fds).
    case controlProtocol(String)

    /// Every virtio-blk payload check validates what the device wrote (R3).
    public var rule: Rule { .r3 }

    /// The check that failed, without the rule prefix.
    public var detail: String {
        switch self {
        case .blockStatusInvalid(let status):
            return "virtio-blk status byte \(status) is not OK, IOERR or UNSUPP"
        case .blockStatusMissing(let id):
            return "virtio-blk request \(id) completed with used len 0 (no status byte)"
        case .blockShortRead(let expected, let got):
            return "virtio-blk read returned \(got) of \(expected) bytes with status OK"
        case .blockConfigInvalid(let field, let value):
            return "virtio-blk config \(field) = \(value) is out of range"
        case .controlProtocol(let what):
            return "vhost-user back-end: \(what)"
        }
    }
}
