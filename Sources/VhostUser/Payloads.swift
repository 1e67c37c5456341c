/// Little-endian cursor over a payload the peer sent. Every read is bounds-checked and
/// throws instead of trapping (rule R4).
struct PayloadReader {
    let bytes: [UInt8]
    var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    mutating func read<T: FixedWidthInteger>(_: T.Type) throws(VhostUserError) -> T {
        let n = MemoryLayout<T>.size
        guard offset + n <= bytes.count else { throw .payloadTooShort(need: offset + n, have: bytes.count) }
        // One load from our own copy of the payload, in bounds by the guard above.
        let v = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: offset, as: T.self) }
        offset += n
        return T(littleEndian: v)
    }

    mutating func readBytes(_ n: Int) throws(VhostUserError) -> [UInt8] {
        guard n >= 0, offset + n <= bytes.count else {
            throw .payloadTooShort(need: offset + max(n, 0), have: bytes.count)
        }
        defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }
}

/// Little-endian payload builder.
struct PayloadWriter {
    var bytes: [UInt8] = []

    /// Room for `capacity` bytes up front: a payload is built with one allocation.
    init(capacity: Int = 8) { bytes.reserveCapacity(capacity) }

    mutating func write<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

/// A payload type with an exact wire size.
public protocol WirePayload: Sendable {
    var encoded: [UInt8] { get }
    static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> Self
}

/// `u64` payloads (features, acks, queue counts, kick/call descriptors' index word).
public struct U64Payload: WirePayload, Equatable {
    /// Bytes on the wire.
    public static let size = 8
    /// The value.
    public var value: UInt64
    /// A payload carrying `value`.
    public init(_ value: UInt64) { self.value = value }
    /// Little-endian bytes.
    public var encoded: [UInt8] {
        var w = PayloadWriter()
        w.write(value)
        return w.bytes
    }
    /// Decodes exactly `size` bytes (anything else is refused, R3).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> U64Payload {
        guard bytes.count == size else { throw .payloadSize(expected: size, got: bytes.count) }
        var r = PayloadReader(bytes)
        return U64Payload(try r.read(UInt64.self))
    }
}

/// `struct vhost_vring_state { unsigned int index; unsigned int num; }`
public struct VringState: WirePayload, Equatable {
    /// Bytes on the wire.
    public static let size = 8
    /// The queue index.
    public var index: UInt32
    /// The number (ring size, or base index).
    public var num: UInt32
    /// A payload for queue `index`.
    public init(index: UInt32, num: UInt32) {
        self.index = index
        self.num = num
    }
    /// Little-endian bytes.
    public var encoded: [UInt8] {
        var w = PayloadWriter()
        w.write(index)
        w.write(num)
        return w.bytes
    }
    /// Decodes exactly `size` bytes (anything else is refused, R3).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> VringState {
        guard bytes.count == size else { throw .payloadSize(expected: size, got: bytes.count) }
        var r = PayloadReader(bytes)
        return VringState(index: try r.read(UInt32.self), num: try r.read(UInt32.self))
    }
}

/// `struct vhost_vring_addr`: index, flags, then descriptor, used, avail and log addresses
/// (front-end virtual addresses, except the log's).
public struct VringAddress: WirePayload, Equatable {
    /// Bytes on the wire.
    public static let size = 40
    /// The queue index.
    public var index: UInt32
    /// VHOST_VRING_F_LOG (never used).
    public var flags: UInt32
    /// User address of the descriptor table.
    public var descriptor: UInt64
    /// User address of the used ring.
    public var used: UInt64
    /// User address of the available ring.
    public var avail: UInt64
    /// Log address (never used).
    public var log: UInt64
    /// A payload for queue `index`.
    public init(index: UInt32, flags: UInt32 = 0, descriptor: UInt64, used: UInt64, avail: UInt64, log: UInt64 = 0) {
        self.index = index
        self.flags = flags
        self.descriptor = descriptor
        self.used = used
        self.avail = avail
        self.log = log
    }
    /// Little-endian bytes.
    public var encoded: [UInt8] {
        var w = PayloadWriter(capacity: Self.size)
        w.write(index)
        w.write(flags)
        w.write(descriptor)
        w.write(used)
        w.write(avail)
        w.write(log)
        return w.bytes
    }
    /// Decodes exactly `size` bytes (anything else is refused, R3).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> VringAddress {
        guard bytes.count == size else { throw .payloadSize(expected: size, got: bytes.count) }
        var r = PayloadReader(bytes)
        return VringAddress(
            index: try r.read(UInt32.self), flags: try r.read(UInt32.self),
            descriptor: try r.read(UInt64.self), used: try r.read(UInt64.self),
            avail: try r.read(UInt64.self), log: try r.read(UInt64.self))
    }
}

/// One memory region: guest address, size, front-end virtual address, offset in the fd.
public struct MemoryRegionDescription: Sendable, Equatable {
    /// Bytes on the wire.
    public static let size = 32
    /// Guest physical address of the region.
    public var guestAddress: UInt64
    /// Bytes of the region.
    public var size: UInt64
    /// The front-end's user address of the region (what ring addresses are given in).
    public var userAddress: UInt64
    /// Offset of the region in the descriptor's file.
    public var mmapOffset: UInt64
    /// A region description.
    public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
        self.guestAddress = guestAddress
        self.size = size
        self.userAddress = userAddress
        self.mmapOffset = mmapOffset
    }
    func write(to w: inout PayloadWriter) {
        w.write(guestAddress)
        w.write(size)
        w.write(userAddress)
        w.write(mmapOffset)
    }
    static func read(from r: inout PayloadReader) throws(VhostUserError) -> MemoryRegionDescription {
        MemoryRegionDescription(
            guestAddress: try r.read(UInt64.self), size: try r.read(UInt64.self),
            userAddress: try r.read(UInt64.self), mmapOffset: try r.read(UInt64.self))
    }
}

/// SET_MEM_TABLE: `u32 nregions; u32 padding; regions[nregions]`, one fd per region.
public struct MemoryTable: WirePayload, Equatable {
    /// Most regions accepted (VHOST_MEMORY_BASELINE_NREGIONS).
    public static let maximumRegions = 8
    /// The regions, one descriptor each.
    public var regions: [MemoryRegionDescription]
    /// A table of `regions`.
    public init(regions: [MemoryRegionDescription]) { self.regions = regions }
    /// Little-endian bytes.
    public var encoded: [UInt8] {
        var w = PayloadWriter(capacity: 8 + regions.count * MemoryRegionDescription.size)
        w.write(UInt32(regions.count))
        w.write(UInt32(0))
        for r in regions { r.write(to: &w) }
        return w.bytes
    }
    /// Decodes the count, bounded by `maximumRegions`, then exactly that many regions (R3).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> MemoryTable {
        var r = PayloadReader(bytes)
        let count = try r.read(UInt32.self)
        _ = try r.read(UInt32.self)
        guard count >= 1, count <= UInt32(maximumRegions) else {
            throw .invalidPayload("SET_MEM_TABLE announces \(count) regions (1...\(maximumRegions) allowed)")
        }
        let expected = 8 + Int(count) * MemoryRegionDescription.size
        guard bytes.count == expected else { throw .payloadSize(expected: expected, got: bytes.count) }
        var regions: [MemoryRegionDescription] = []
        regions.reserveCapacity(Int(count))
        for _ in 0..<count { regions.append(try MemoryRegionDescription.read(from: &r)) }
        return MemoryTable(regions: regions)
    }
}

/// ADD_MEM_REG / REM_MEM_REG: `u64 padding; region`.
public struct SingleMemoryRegion: WirePayload, Equatable {
    /// Bytes on the wire (`u64 padding` and one region).
    public static let size = 40
    /// The region.
    public var region: MemoryRegionDescription
    /// A payload for `region`.
    public init(_ region: MemoryRegionDescription) { self.region = region }
    /// Little-endian bytes.
    public var encoded: [UInt8] {
        var w = PayloadWriter(capacity: Self.size)
        w.write(UInt64(0))
        region.write(to: &w)
        return w.bytes
    }
    /// Decodes exactly `size` bytes (anything else is refused, R3).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> SingleMemoryRegion {
        guard bytes.count == size else { throw .payloadSize(expected: size, got: bytes.count) }
        var r = PayloadReader(bytes)
        _ = try r.read(UInt64.self)
        return SingleMemoryRegion(try MemoryRegionDescription.read(from: &r))
    }
}

/// SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR: queue index in bits 0-7, bit 8 set
/// when no descriptor accompanies the message.
public struct VringFile: WirePayload, Equatable {
    /// Bytes on the wire.
    public static let size = 8
    /// VHOST_USER_VRING_NOFD_MASK.
    public static let noDescriptorFlag: UInt64 = 1 << 8
    /// The queue index.
    public var index: UInt8
    /// No descriptor accompanies the message (polling mode).
    public var noDescriptor: Bool
    /// A payload for queue `index`.
    public init(index: UInt8, noDescriptor: Bool = false) {
        self.index = index
        self.noDescriptor = noDescriptor
    }
    /// Little-endian bytes.
    public var encoded: [UInt8] {
        U64Payload(UInt64(index) | (noDescriptor ? Self.noDescriptorFlag : 0)).encoded
    }
    /// Decodes exactly `size` bytes (anything else is refused, R3).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> VringFile {
        let v = try U64Payload.decode(bytes).value
        guard v & ~(0xff | noDescriptorFlag) == 0 else {
            throw .invalidPayload("vring file word 0x\(String(v, radix: 16)) has unknown bits")
        }
        return VringFile(index: UInt8(truncatingIfNeeded: v), noDescriptor: v & noDescriptorFlag != 0)
    }
}

/// GET_CONFIG / SET_CONFIG: `u32 offset; u32 size; u32 flags; u8 payload[size]`.
public struct ConfigSpace: WirePayload, Equatable {
    /// Bytes before the payload.
    public static let headerSize = 12
    /// Largest config space accepted (VHOST_USER_MAX_CONFIG_SIZE).
    public static let maximumSize = 256
    /// Offset into the config space.
    public var offset: UInt32
    /// VHOST_SET_CONFIG_TYPE_* flags.
    public var flags: UInt32
    /// The config bytes.
    public var payload: [UInt8]
    /// A config access at `offset`.
    public init(offset: UInt32 = 0, flags: UInt32 = 0, payload: [UInt8]) {
        self.offset = offset
        self.flags = flags
        self.payload = payload
    }
    /// Little-endian bytes.
    public var encoded: [UInt8] {
        var w = PayloadWriter(capacity: Self.headerSize + payload.count)
        w.write(offset)
        w.write(UInt32(payload.count))
        w.write(flags)
        w.bytes += payload
        return w.bytes
    }
    /// Decodes the header and a payload of exactly the announced size, at most `maximumSize` (R3).
    public static func decode(_ bytes: [UInt8]) throws(VhostUserError) -> ConfigSpace {
        var r = PayloadReader(bytes)
        let offset = try r.read(UInt32.self)
        let size = try r.read(UInt32.self)
        let flags = try r.read(UInt32.self)
        guard size <= UInt32(maximumSize) else {
            throw .invalidPayload("config size \(size) exceeds \(maximumSize)")
        }
        guard bytes.count == headerSize + Int(size) else {
            throw .payloadSize(expected: headerSize + Int(size), got: bytes.count)
        }
        return ConfigSpace(offset: offset, flags: flags, payload: try r.readBytes(Int(size)))
    }
}
