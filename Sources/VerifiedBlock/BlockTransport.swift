public import SharedMemory

/// One transfer of a batch: `buffer.count` bytes at byte `offset` of the back-end's disk.
public struct TransportRequest {
    public var offset: UInt64
    public var buffer: UnsafeMutableRawBufferPointer
    public var write: Bool

    public init(offset: UInt64, buffer: UnsafeMutableRawBufferPointer, write: Bool) {
        self.offset = offset
        self.buffer = buffer
        self.write = write
    }
}

/// Why a transport failed a batch: its own typed error, flattened to what the verified
/// layer needs (the rule it named, if the back-end broke one, and the message).
public struct TransportError: Error, Equatable, Sendable, CustomStringConvertible {
    public var rule: Rule?
    public var message: String

    public init(rule: Rule?, _ message: String) {
        self.rule = rule
        self.message = message
    }

    public var description: String { message }
}

/// The one small protocol `VerifiedBlockDevice` and `VerityDevice` need from a block
/// transport: the virtio-blk driver, the Xen blkif frontend, a file, or memory. Every
/// byte it returns is untrusted; the layers above check them all.
public protocol BlockTransport: AnyObject {
    /// The disk's size in bytes as the back-end announced it (only sizes the layout).
    var capacityBytes: UInt64 { get }
    /// Runs every transfer of `requests`, in flight together where the transport can, and
    /// returns when all have completed; throws if any failed (then any may have happened).
    /// Offsets and lengths are multiples of 512.
    func transfer(_ requests: [TransportRequest]) throws(TransportError)
    /// Makes every completed write durable on the back-end.
    func flushWrites() throws(TransportError)
}
