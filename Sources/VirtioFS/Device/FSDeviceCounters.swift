import SharedMemory

/// The kinds of FUSE request an operator tells apart (`ringfence_requests_total{class=...}`).
public enum FSRequestClass: String, Sendable, CaseIterable, Codable {
    /// READ.
    case read
    /// WRITE.
    case write
    /// LOOKUP, FORGET, BATCH_FORGET, GETATTR, SETATTR, READLINK, STATFS, ACCESS, *XATTR.
    case metadata
    /// OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR.
    case directory
    /// OPEN, CREATE, RELEASE, FLUSH, FSYNC, LSEEK, FALLOCATE, COPY_FILE_RANGE, locks.
    case open
    /// MKNOD, MKDIR, UNLINK, RMDIR, RENAME, RENAME2, LINK, SYMLINK.
    case namespace
    /// INIT, DESTROY, INTERRUPT, SYNCFS.
    case session
    /// Anything else (unknown or unsupported opcodes, a request too short for a header).
    case other

    public init(opcode: UInt32) {
        typealias Op = FuseProtocol.Opcode
        guard let op = Op(rawValue: opcode) else {
            self = .other
            return
        }
        switch op {
        case .read: self = .read
        case .write: self = .write
        case .lookup, .forget, .batchForget, .getattr, .setattr, .readlink, .statfs, .access, .getxattr, .listxattr,
            .setxattr, .removexattr:
            self = .metadata
        case .opendir, .readdir, .readdirplus, .releasedir, .fsyncdir: self = .directory
        case .open, .create, .release, .flush, .fsync, .lseek, .fallocate, .copyFileRange, .getlk, .setlk, .setlkw:
            self = .open
        case .mknod, .mkdir, .unlink, .rmdir, .rename, .rename2, .link, .symlink: self = .namespace
        case .initialize, .destroy, .interrupt, .syncfs: self = .session
        default: self = .other
        }
    }
}

/// What a `VirtioFSDevice` has served since it was made, counted by the queue threads
/// and read by anyone (an operator's metrics endpoint, a log dump).
public struct FSDeviceStatistics: Sendable, Equatable, Codable {
    /// Requests answered (or completed without a reply), by class.
    public var requests: [FSRequestClass: Int] = [:]
    /// File bytes READ returned to the driver and WRITE put into files.
    public var bytesRead = 0
    public var bytesWritten = 0
    /// Requests answered with an error.
    public var failed = 0
    /// Chains or requests refused for breaking a rule ("R3": n).
    public var violations: [String: Int] = [:]

    public init() {}
}

/// The live counters behind `VirtioFSDevice.statistics` (one lock, taken once per request).
final class FSDeviceCounters: Sendable {
    let state = Locked(FSDeviceStatistics())

    func request(_ kind: FSRequestClass, read: Int, written: Int, failed: Bool) {
        state.withLock { s in
            s.requests[kind, default: 0] += 1
            s.bytesRead += read
            s.bytesWritten += written
            if failed { s.failed += 1 }
        }
    }

    func violation(_ rule: Rule) { state.withLock { $0.violations[rule.rawValue, default: 0] += 1 } }
}
