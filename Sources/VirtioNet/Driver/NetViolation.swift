public import SharedMemory

/// What a virtio-net device did wrong above the ring (the ring's own checks are
/// `Violation`'s). The first one breaks the device (R6).
public enum NetViolation: RuleViolation, Equatable {
    /// A receive buffer's used length is shorter than the 12-byte header.
    case usedLengthShorterThanHeader(length: UInt32)
    /// A merged buffer's used length exceeds what we posted in that buffer.
    case usedLengthBeyondBuffer(length: UInt32, posted: Int)
    /// num_buffers 0, or more buffers than we had posted.
    case numBuffersInvalid(numBuffers: UInt16, posted: Int)
    /// num_buffers > 1 without VIRTIO_NET_F_MRG_RXBUF.
    case numBuffersWithoutMergeable(numBuffers: UInt16)
    /// A received frame longer than MTU + Ethernet header (+ VLAN tag) or shorter than an
    /// Ethernet header.
    case frameLengthInvalid(length: Int, maximum: Int)
    /// A header field (gso type/size, flags, csum_start/offset) the negotiation forbids.
    case headerInvalid(String)
    /// The control queue ack is neither OK nor ERR (includes the sentinel never written).
    case controlAckInvalid(ack: UInt8)
    /// A config field the driver refuses (MTU < 68, max_virtqueue_pairs 0 or > 0x8000,
    /// status bits unknown, ...).
    case configInvalid(field: String, value: UInt64)
    /// A config field read again differs from what was validated at negotiation.
    case configChanged(field: String, was: UInt64, now: UInt64)
    /// The back-end acked features that break the spec's dependency rules.
    case featureDependency(String)
    /// The vhost-user back-end broke the control protocol (bad reply, wrong size, fds).
    case controlProtocol(String)
    /// VHOST_USER_GET_QUEUE_NUM (queue pairs, as QEMU and DPDK read it for net) outside
    /// 1...0x8000, the most virtio-net can address.
    case queueCountInvalid(reported: UInt64)

    public var rule: Rule { .r3 }

    public var detail: String {
        switch self {
        case .usedLengthShorterThanHeader(let length):
            return "virtio-net receive used len \(length) is shorter than the 12-byte header"
        case .usedLengthBeyondBuffer(let length, let posted):
            return "virtio-net receive used len \(length) exceeds the \(posted)-byte buffer posted"
        case .numBuffersInvalid(let n, let posted):
            return "virtio-net num_buffers \(n) is not in 1...\(posted) (buffers posted)"
        case .numBuffersWithoutMergeable(let n):
            return "virtio-net num_buffers \(n) without VIRTIO_NET_F_MRG_RXBUF"
        case .frameLengthInvalid(let length, let maximum):
            return "virtio-net received frame of \(length) bytes is not in 14...\(maximum)"
        case .headerInvalid(let what):
            return "virtio-net header: \(what)"
        case .controlAckInvalid(let ack):
            return "virtio-net control ack \(ack) is neither OK nor ERR"
        case .configInvalid(let field, let value):
            return "virtio-net config \(field) = \(value) is out of range"
        case .configChanged(let field, let was, let now):
            return "virtio-net config \(field) changed from \(was) to \(now) after validation"
        case .featureDependency(let what):
            return "virtio-net features: \(what)"
        case .controlProtocol(let what):
            return "vhost-user back-end: \(what)"
        case .queueCountInvalid(let n):
            return "vhost-user GET_QUEUE_NUM \(n) is not in 1...\(NetProtocol.maximumQueuePairs) queue pairs"
        }
    }
}
