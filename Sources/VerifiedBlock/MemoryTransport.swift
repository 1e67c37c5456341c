/// A disk in private memory with hooks that lie: the unit tests' back-end. Reads and
/// writes go through `onRead` / `onWrite`, so a test can flip bits, return another
/// block, drop a write or keep a snapshot.
public final class MemoryTransport: BlockTransport {
    public var bytes: [UInt8]
    /// Called after a read filled `buffer` from `offset`; may change what is returned.
    public var onRead: ((_ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) -> Void)?
    /// Decides whether a write at `offset` is stored (true) or acknowledged and dropped.
    public var onWrite: ((_ offset: UInt64, _ data: UnsafeRawBufferPointer) -> Bool)?
    public private(set) var reads = 0
    public private(set) var writes = 0
    public private(set) var flushes = 0

    public init(capacity: Int) {
        bytes = [UInt8](repeating: 0, count: capacity)
    }

    public var capacityBytes: UInt64 { UInt64(bytes.count) }

    public func transfer(_ requests: [TransportRequest]) throws(TransportError) {
        for r in requests {
            guard r.offset <= UInt64(bytes.count), UInt64(r.buffer.count) <= UInt64(bytes.count) - r.offset else {
                throw TransportError(rule: nil, "memory transport: \(r.offset)+\(r.buffer.count) is out of range")
            }
            let start = Int(r.offset)
            if r.write {
                writes += 1
                if let onWrite, !onWrite(r.offset, UnsafeRawBufferPointer(r.buffer)) { continue }
                bytes.withUnsafeMutableBytes { disk in
                    UnsafeMutableRawBufferPointer(rebasing: disk[start..<start + r.buffer.count])
                        .copyMemory(from: UnsafeRawBufferPointer(r.buffer))
                }
            } else {
                reads += 1
                bytes.withUnsafeBytes { disk in
                    r.buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: disk[start..<start + r.buffer.count]))
                }
                onRead?(r.offset, r.buffer)
            }
        }
    }

    public func flushWrites() throws(TransportError) { flushes += 1 }
}
