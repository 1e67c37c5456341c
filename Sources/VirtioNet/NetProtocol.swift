import VhostUser

/// virtio-net wire format (virtio 1.x §5.1). Shared by the driver and the device.
public enum NetProtocol {
    /// `struct virtio_net_hdr` with `num_buffers` (VERSION_1: always 12 bytes).
    public static let headerSize = 12
    /// Destination, source, EtherType.
    public static let ethernetHeaderSize = 14
    /// A VLAN tag a frame may carry on top of the MTU.
    public static let vlanTagSize = 4
    /// The smallest MTU a device may announce (IPv4's minimum, as Linux enforces).
    public static let minimumMTU = 68
    /// The MTU without VIRTIO_NET_F_MTU.
    public static let defaultMTU = 1500
    /// Largest MTU we accept from a device (a 64 KiB frame).
    public static let maximumMTU = 65535 - ethernetHeaderSize - vlanTagSize
    /// max_virtqueue_pairs: 1...0x8000 (virtio 1.x §5.1.4).
    public static let maximumQueuePairs = 0x8000

    /// Device feature bits.
    public enum Feature {
        public static let csum: UInt64 = 1 << 0
        public static let guestCsum: UInt64 = 1 << 1
        public static let ctrlGuestOffloads: UInt64 = 1 << 2
        public static let mtu: UInt64 = 1 << 3
        public static let mac: UInt64 = 1 << 5
        public static let guestTSO4: UInt64 = 1 << 7
        public static let guestTSO6: UInt64 = 1 << 8
        public static let guestECN: UInt64 = 1 << 9
        public static let guestUFO: UInt64 = 1 << 10
        public static let hostTSO4: UInt64 = 1 << 11
        public static let hostTSO6: UInt64 = 1 << 12
        public static let hostECN: UInt64 = 1 << 13
        public static let hostUFO: UInt64 = 1 << 14
        public static let mergeableRxBuffers: UInt64 = 1 << 15
        public static let status: UInt64 = 1 << 16
        public static let ctrlVQ: UInt64 = 1 << 17
        public static let ctrlRx: UInt64 = 1 << 18
        public static let ctrlVLAN: UInt64 = 1 << 19
        public static let ctrlRxExtra: UInt64 = 1 << 20
        public static let guestAnnounce: UInt64 = 1 << 21
        public static let mq: UInt64 = 1 << 22
        public static let ctrlMACAddr: UInt64 = 1 << 23
        public static let notfCoal: UInt64 = 1 << 53
        public static let hashReport: UInt64 = 1 << 57
        public static let rss: UInt64 = 1 << 60

        /// Features that need the control queue (virtio 1.x §5.1.3.1).
        public static let needingControlQueue: UInt64 =
            ctrlRx | ctrlVLAN | ctrlRxExtra | guestAnnounce | mq | ctrlMACAddr | rss | hashReport | notfCoal
            | ctrlGuestOffloads
    }

    /// `virtio_net_hdr.flags`.
    public enum HeaderFlag {
        public static let needsCsum: UInt8 = 1
        public static let dataValid: UInt8 = 2
        public static let rscInfo: UInt8 = 4
    }

    /// `virtio_net_hdr.gso_type`.
    public enum GSOType: UInt8, Sendable {
        case none = 0
        case tcpv4 = 1
        case udp = 3
        case tcpv6 = 4
        case udpL4 = 5
    }

    /// Config `status` bits.
    public enum Status {
        public static let linkUp: UInt16 = 1
        public static let announce: UInt16 = 2
        public static let known: UInt16 = linkUp | announce
    }

    /// Control queue classes and commands (virtio 1.x §5.1.6.5).
    public enum Control {
        public static let classRx: UInt8 = 0
        public static let rxPromisc: UInt8 = 0
        public static let rxAllMulti: UInt8 = 1
        public static let classMAC: UInt8 = 1
        public static let macTableSet: UInt8 = 0
        public static let macAddrSet: UInt8 = 1
        public static let classVLAN: UInt8 = 2
        public static let classAnnounce: UInt8 = 3
        public static let announceAck: UInt8 = 0
        public static let classMQ: UInt8 = 4
        public static let mqPairsSet: UInt8 = 0
        /// The ack byte: OK or ERR; anything else is a device fault.
        public static let ok: UInt8 = 0
        public static let err: UInt8 = 1
        /// Largest command payload either side handles (a MAC table of 64 + 64 entries).
        public static let maximumPayload = 8 + 128 * 6
    }

    /// Virtqueue indices: receiveq k is 2k, transmitq k is 2k+1, the control queue is
    /// 2 * max_virtqueue_pairs (2 without MQ).
    public static func receiveQueue(pair: Int) -> Int { 2 * pair }
    public static func transmitQueue(pair: Int) -> Int { 2 * pair + 1 }
    public static func controlQueue(pairs: Int) -> Int { 2 * pairs }

    static func put<T: FixedWidthInteger>(_ v: T, into b: inout [UInt8], at offset: Int) {
        for i in 0..<MemoryLayout<T>.size { b[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }
}

/// `struct virtio_net_hdr` (12 bytes, little-endian). Decoding only reads bytes; each side
/// validates (`NetHeaderCheck`) before it acts on a field (R3).
public struct NetHeader: Sendable, Hashable {
    public var flags: UInt8 = 0
    public var gsoType: UInt8 = 0
    public var headerLength: UInt16 = 0
    public var gsoSize: UInt16 = 0
    public var csumStart: UInt16 = 0
    public var csumOffset: UInt16 = 0
    public var numBuffers: UInt16 = 0

    public init() {}

    public init(numBuffers: UInt16) { self.numBuffers = numBuffers }

    /// Decodes the 12 bytes at `p` (private memory: the copy taken once, R2).
    public init(bytes p: UnsafeRawPointer) {
        flags = p.load(as: UInt8.self)
        gsoType = p.load(fromByteOffset: 1, as: UInt8.self)
        headerLength = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        gsoSize = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        csumStart = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        csumOffset = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        numBuffers = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 10, as: UInt16.self))
    }

    public init(_ bytes: [UInt8]) {
        var b = bytes
        if b.count < NetProtocol.headerSize { b += [UInt8](repeating: 0, count: NetProtocol.headerSize - b.count) }
        self = b.withUnsafeBytes { raw in raw.baseAddress.map { NetHeader(bytes: $0) } ?? NetHeader() }
    }

    public var encoded: [UInt8] {
        var b = [UInt8](repeating: 0, count: NetProtocol.headerSize)
        b[0] = flags
        b[1] = gsoType
        NetProtocol.put(headerLength, into: &b, at: 2)
        NetProtocol.put(gsoSize, into: &b, at: 4)
        NetProtocol.put(csumStart, into: &b, at: 6)
        NetProtocol.put(csumOffset, into: &b, at: 8)
        NetProtocol.put(numBuffers, into: &b, at: 10)
        return b
    }

    /// Whether the 12 private bytes at `p` carry no offload at all (flags, gso_type and
    /// gso_size all 0): such a header passes `problem(frameLength:partialChecksum:)` for
    /// any frame, and without partial checksums it is the only kind that does. The
    /// per-frame fast path of a transmit queue.
    @inline(__always)
    public static func isPlain(bytes p: UnsafeRawPointer) -> Bool {
        p.loadUnaligned(as: UInt16.self) == 0 && p.loadUnaligned(fromByteOffset: 4, as: UInt16.self) == 0
    }

    /// Why this header may not come with a frame of `frameLength` bytes, given which
    /// offloads the receiver negotiated (`partialChecksum`: NEEDS_CSUM allowed; no GSO is
    /// ever negotiated here), or nil. The same check on both sides.
    public func problem(frameLength: Int, partialChecksum: Bool) -> String? {
        guard gsoType == NetProtocol.GSOType.none.rawValue else {
            return "gso_type \(gsoType) although no segmentation offload was negotiated"
        }
        guard gsoSize == 0 else { return "gso_size \(gsoSize) with gso_type NONE" }
        let known = partialChecksum ? NetProtocol.HeaderFlag.needsCsum | NetProtocol.HeaderFlag.dataValid : 0
        guard flags & ~known == 0 else { return "flags 0x\(String(flags, radix: 16)) were not negotiated" }
        if flags & NetProtocol.HeaderFlag.needsCsum != 0 {
            // The 16-bit checksum field must lie inside the frame.
            let end = Int(csumStart) + Int(csumOffset) + 2
            guard end <= frameLength else {
                return
                    "NEEDS_CSUM csum_start \(csumStart) + csum_offset \(csumOffset) is outside the \(frameLength)-byte frame"
            }
        }
        return nil
    }
}

/// `struct virtio_net_config` up to `mtu` (12 bytes): mac, status, max_virtqueue_pairs,
/// mtu. Decoding never trusts the values; the driver validates (`NetInfo.validate`).
public struct NetConfig: Sendable, Equatable {
    public static let size = 12

    public var mac: [UInt8] = [0, 0, 0, 0, 0, 0]
    public var status: UInt16 = 0
    public var maxVirtqueuePairs: UInt16 = 1
    public var mtu: UInt16 = 0

    public init() {}

    public var encoded: [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        for i in 0..<6 { b[i] = i < mac.count ? mac[i] : 0 }
        NetProtocol.put(status, into: &b, at: 6)
        NetProtocol.put(maxVirtqueuePairs, into: &b, at: 8)
        NetProtocol.put(mtu, into: &b, at: 10)
        return b
    }

    /// GET_CONFIG of `size` bytes from `offset`: bytes past the structure read as zero;
    /// nil for a range outside the config space.
    public func read(offset: UInt32, size: Int) -> [UInt8]? {
        guard size >= 0, size <= ConfigSpace.maximumSize, offset <= UInt32(ConfigSpace.maximumSize) else { return nil }
        let bytes = encoded
        return (0..<size).map { i in
            let o = Int(offset) + i
            return o < bytes.count ? bytes[o] : 0
        }
    }

    /// Reads whatever prefix the device supplied; missing fields stay zero.
    public static func decode(_ bytes: [UInt8]) -> NetConfig {
        var b = bytes
        if b.count < size { b += [UInt8](repeating: 0, count: size - b.count) }
        var c = NetConfig()
        c.mac = Array(b[0..<6])
        c.status = UInt16(b[6]) | UInt16(b[7]) << 8
        c.maxVirtqueuePairs = UInt16(b[8]) | UInt16(b[9]) << 8
        c.mtu = UInt16(b[10]) | UInt16(b[11]) << 8
        return c
    }
}

/// A MAC address as text (`52:54:00:12:34:56`).
public func formatMAC(_ mac: [UInt8]) -> String {
    mac.map { b in
        let s = String(b, radix: 16)
        return s.count == 1 ? "0" + s : s
    }.joined(separator: ":")
}

/// Parses `aa:bb:cc:dd:ee:ff`; nil if malformed.
public func parseMAC(_ text: String) -> [UInt8]? {
    let parts = text.split(separator: ":")
    guard parts.count == 6 else { return nil }
    var mac: [UInt8] = []
    for p in parts {
        guard p.count <= 2, let b = UInt8(p, radix: 16) else { return nil }
        mac.append(b)
    }
    return mac
}
