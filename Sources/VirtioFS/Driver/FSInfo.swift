import SharedMemory

/// The device after validation: config space (when the back-end serves one) and the
/// INIT answer, clamped or refused (R3). The driver decides only from this.
public struct FSInfo: Sendable, Equatable {
    /// The mount tag (from config space, else what the caller named), without padding.
    public let tag: String
    /// Request queues we use (the hiprio queue is extra).
    public let requestQueues: Int
    /// Negotiated virtio feature bits.
    public let features: UInt64
    /// The protocol minor both sides speak.
    public let minor: UInt32
    /// Largest WRITE payload (4 KiB...`transferCap`), and largest READ we ask for.
    public let maxWrite: Int
    public let maxPages: Int
    public let initFlags: UInt32

    /// Largest data transfer per request whatever the device says (keeps the bounce pool
    /// shareable).
    public static let transferCap = 1 << 20

    /// Validates the config space: the tag is UTF-8, NUL-padded (all 36 bytes may be
    /// used, without a terminator), not empty, without a newline or any other control
    /// character; num_request_queues is at least 1 (clamped to what GET_QUEUE_NUM leaves
    /// and what the caller asked).
    public static func validateConfig(_ config: FSConfig, backendQueues: Int, requestedQueues: Int)
        throws(FSViolation) -> (tag: String, requestQueues: Int)
    {
        let raw = config.tag.prefix(FSConfig.tagSize)
        let end = raw.firstIndex(of: 0) ?? raw.endIndex
        let name = raw[raw.startIndex..<end]
        guard raw[end...].allSatisfy({ $0 == 0 }) else {
            throw .configInvalid(field: "tag", detail: "bytes after the NUL terminator are not NUL padding")
        }
        guard !name.isEmpty else { throw .configInvalid(field: "tag", detail: "empty") }
        guard let tag = String(validating: name, as: UTF8.self) else {
            throw .configInvalid(field: "tag", detail: "not UTF-8")
        }
        guard !name.contains(where: { $0 < 0x20 || $0 == 0x7f }) else {
            throw .configInvalid(field: "tag", detail: "contains a newline or control character")
        }
        guard config.numRequestQueues >= 1 else {
            throw .configInvalid(field: "num_request_queues", detail: "0 (at least 1 is required)")
        }
        let queues = max(1, min(Int(config.numRequestQueues), backendQueues - 1, requestedQueues))
        return (tag, queues)
    }

    /// Validates INIT's answer: major 7 and a minor we parse; max_write clamped to
    /// 4 KiB...`transferCap`, max_pages to 1...256.
    public static func validateInit(_ out: FuseInitOut) throws(FSViolation) -> (
        minor: UInt32, maxWrite: Int, maxPages: Int, flags: UInt32
    ) {
        guard out.major == FuseProtocol.majorVersion, out.minor >= FuseProtocol.minimumMinorVersion else {
            throw .initVersion(major: out.major, minor: out.minor)
        }
        let minor = min(out.minor, FuseProtocol.minorVersion)
        let maxWrite = min(max(Int(out.maxWrite), 4096), transferCap)
        let maxPages = out.flags & FuseProtocol.InitFlag.maxPages != 0 ? min(max(Int(out.maxPages), 1), 256) : 32
        return (minor, maxWrite, maxPages, out.flags)
    }

    init(
        tag: String, requestQueues: Int, features: UInt64, minor: UInt32, maxWrite: Int, maxPages: Int,
        initFlags: UInt32
    ) {
        self.tag = tag
        self.requestQueues = requestQueues
        self.features = features
        self.minor = minor
        self.maxWrite = maxWrite
        self.maxPages = maxPages
        self.initFlags = initFlags
    }

    /// Largest READ per request: max_write and max_pages both bound it.
    public var maxRead: Int { max(4096, min(maxWrite, maxPages * 4096)) }
}
