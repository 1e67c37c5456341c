public import SharedMemory

/// What a virtio-fs device did wrong above the ring (the ring's own checks are
/// `Violation`'s). The first one breaks the driver (R6).
public enum FSViolation: RuleViolation, Equatable {
    /// The used length is shorter than a reply header.
    case replyTooShort(usedLength: UInt32)
    /// The used length and the reply header's `len` disagree.
    case replyLengthMismatch(usedLength: UInt32, headerLength: UInt32)
    /// The reply's `unique` is not the one of the request it completes.
    case uniqueMismatch(expected: UInt64, got: UInt64)
    /// The error is positive or not above -4096.
    case errorOutOfRange(Int32)
    /// An error reply longer than its 16-byte header.
    case errorWithBody(length: UInt32)
    /// A fixed-size reply of the wrong size.
    case replySize(opcode: String, expected: Int, got: Int)
    /// A variable reply longer than what was asked.
    case replyTooLong(opcode: String, limit: Int, got: Int)
    /// A reply to a request that has none (FORGET, BATCH_FORGET), or any reply on hiprio.
    case unexpectedReply(queue: Int, length: UInt32)
    /// INIT answered with another major version or a minor we cannot parse.
    case initVersion(major: UInt32, minor: UInt32)
    /// A nodeid that cannot be what the reply says: 0 or the root where an inode was promised.
    case nodeIDInvalid(opcode: String, nodeID: UInt64)
    /// An attribute with a mode whose type is none of the seven file types.
    case attributeType(nodeID: UInt64, mode: UInt32)
    /// An attribute with a size above Int64.max.
    case attributeSize(nodeID: UInt64, size: UInt64)
    /// A nodeid we know changed its file type.
    case typeChanged(nodeID: UInt64, was: UInt32, now: UInt32)
    /// A directory entry's name length is not 1...255.
    case direntNameLength(UInt32)
    /// A directory entry (with its padding) runs past the reply.
    case direntPastBuffer(offset: Int, length: Int, buffer: Int)
    /// A directory entry's name contains '/' or NUL.
    case direntName(String)
    /// A directory offset of 0 or one already seen in this listing (an endless listing),
    /// or a listing grown past the bound.
    case direntOffset(offset: UInt64)
    case listingTooLong(entries: Int)
    /// WRITE reported more bytes written than were sent.
    case writeCount(sent: Int, reported: UInt32)
    /// A symlink target with NUL bytes.
    case linkTarget(length: Int)
    /// The config space cannot be used (tag, num_request_queues).
    case configInvalid(field: String, detail: String)
    /// The vhost-user back-end broke the control protocol.
    case controlProtocol(String)

    public var rule: Rule {
        switch self {
        case .direntOffset, .listingTooLong: return .r5
        default: return .r3
        }
    }

    public var detail: String {
        switch self {
        case .replyTooShort(let n): return "virtio-fs reply of \(n) bytes is shorter than its 16-byte header"
        case .replyLengthMismatch(let used, let header):
            return "virtio-fs used length \(used) differs from the reply header's len \(header)"
        case .uniqueMismatch(let e, let g): return "virtio-fs reply unique \(g) is not the request's \(e)"
        case .errorOutOfRange(let e): return "virtio-fs reply error \(e) is not in (-4096, 0]"
        case .errorWithBody(let n): return "virtio-fs error reply of \(n) bytes carries a body"
        case .replySize(let op, let e, let g): return "virtio-fs \(op) reply body of \(g) bytes, expected \(e)"
        case .replyTooLong(let op, let l, let g): return "virtio-fs \(op) reply body of \(g) bytes exceeds \(l)"
        case .unexpectedReply(let q, let n):
            return "virtio-fs queue \(q) returned \(n) bytes for a request with no reply"
        case .initVersion(let ma, let mi): return "virtio-fs INIT answered protocol \(ma).\(mi), need 7.23 or later"
        case .nodeIDInvalid(let op, let id): return "virtio-fs \(op) returned nodeid \(id)"
        case .attributeType(let id, let mode):
            return "virtio-fs attributes of nodeid \(id) have mode 0o\(String(mode, radix: 8)) (no file type)"
        case .attributeSize(let id, let s): return "virtio-fs attributes of nodeid \(id) have size \(s) > Int64.max"
        case .typeChanged(let id, let was, let now):
            return "virtio-fs nodeid \(id) changed type from 0o\(String(was, radix: 8)) to 0o\(String(now, radix: 8))"
        case .direntNameLength(let n): return "virtio-fs directory entry name length \(n) is not 1...255"
        case .direntPastBuffer(let o, let l, let b):
            return "virtio-fs directory entry at \(o) of \(l) bytes runs past the \(b)-byte reply"
        case .direntName(let n): return "virtio-fs directory entry name \(n.debugDescription) contains '/' or NUL"
        case .direntOffset(let o): return "virtio-fs directory offset \(o) is 0 or repeats an earlier entry's"
        case .listingTooLong(let n): return "virtio-fs directory listing exceeds \(n) entries"
        case .writeCount(let s, let r): return "virtio-fs WRITE reported \(r) bytes written of \(s) sent"
        case .linkTarget(let n): return "virtio-fs READLINK target of \(n) bytes contains NUL"
        case .configInvalid(let f, let d): return "virtio-fs config \(f): \(d)"
        case .controlProtocol(let what): return "vhost-user back-end: \(what)"
        }
    }
}
