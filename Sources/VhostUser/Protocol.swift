/// vhost-user protocol constants (QEMU `docs/interop/vhost-user.rst`).
///
/// Only what RingFence speaks is named. Requests outside this set are "unknown": a back-end
/// answers them per the spec (or drops the connection), a front-end never sends them.
public enum Request: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// VHOST_USER_GET_FEATURES.
    case getFeatures = 1
    /// VHOST_USER_SET_FEATURES.
    case setFeatures = 2
    /// VHOST_USER_SET_OWNER.
    case setOwner = 3
    /// VHOST_USER_RESET_OWNER.
    case resetOwner = 4
    /// VHOST_USER_SET_MEM_TABLE.
    case setMemTable = 5
    /// VHOST_USER_SET_LOG_BASE.
    case setLogBase = 6
    /// VHOST_USER_SET_LOG_FD.
    case setLogFD = 7
    /// VHOST_USER_SET_VRING_NUM.
    case setVringNum = 8
    /// VHOST_USER_SET_VRING_ADDR.
    case setVringAddr = 9
    /// VHOST_USER_SET_VRING_BASE.
    case setVringBase = 10
    /// VHOST_USER_GET_VRING_BASE.
    case getVringBase = 11
    /// VHOST_USER_SET_VRING_KICK.
    case setVringKick = 12
    /// VHOST_USER_SET_VRING_CALL.
    case setVringCall = 13
    /// VHOST_USER_SET_VRING_ERR.
    case setVringErr = 14
    /// VHOST_USER_GET_PROTOCOL_FEATURES.
    case getProtocolFeatures = 15
    /// VHOST_USER_SET_PROTOCOL_FEATURES.
    case setProtocolFeatures = 16
    /// VHOST_USER_GET_QUEUE_NUM.
    case getQueueNum = 17
    /// VHOST_USER_SET_VRING_ENABLE.
    case setVringEnable = 18
    /// VHOST_USER_SEND_RARP.
    case sendRARP = 19
    /// VHOST_USER_NET_SET_MTU.
    case netSetMTU = 20
    /// VHOST_USER_SET_BACKEND_REQ_FD.
    case setBackendReqFD = 21
    /// VHOST_USER_IOTLB_MSG.
    case iotlbMessage = 22
    /// VHOST_USER_SET_VRING_ENDIAN.
    case setVringEndian = 23
    /// VHOST_USER_GET_CONFIG.
    case getConfig = 24
    /// VHOST_USER_SET_CONFIG.
    case setConfig = 25
    /// VHOST_USER_GET_INFLIGHT_FD.
    case getInflightFD = 31
    /// VHOST_USER_SET_INFLIGHT_FD.
    case setInflightFD = 32
    /// VHOST_USER_RESET_DEVICE.
    case resetDevice = 34
    /// VHOST_USER_VRING_KICK.
    case vringKick = 35
    /// VHOST_USER_GET_MAX_MEM_SLOTS.
    case getMaxMemSlots = 36
    /// VHOST_USER_ADD_MEM_REG.
    case addMemReg = 37
    /// VHOST_USER_REM_MEM_REG.
    case remMemReg = 38
    /// VHOST_USER_SET_STATUS.
    case setStatus = 39
    /// VHOST_USER_GET_STATUS.
    case getStatus = 40

    /// The request's name as the spec spells it.
    public var description: String {
        switch self {
        case .getFeatures: return "GET_FEATURES"
        case .setFeatures: return "SET_FEATURES"
        case .setOwner: return "SET_OWNER"
        case .resetOwner: return "RESET_OWNER"
        case .setMemTable: return "SET_MEM_TABLE"
        case .setLogBase: return "SET_LOG_BASE"
        case .setLogFD: return "SET_LOG_FD"
        case .setVringNum: return "SET_VRING_NUM"
        case .setVringAddr: return "SET_VRING_ADDR"
        case .setVringBase: return "SET_VRING_BASE"
        case .getVringBase: return "GET_VRING_BASE"
        case .setVringKick: return "SET_VRING_KICK"
        case .setVringCall: return "SET_VRING_CALL"
        case .setVringErr: return "SET_VRING_ERR"
        case .getProtocolFeatures: return "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: return "SET_PROTOCOL_FEATURES"
        case .getQueueNum: return "GET_QUEUE_NUM"
        case .setVringEnable: return "SET_VRING_ENABLE"
        case .sendRARP: return "SEND_RARP"
        case .netSetMTU: return "NET_SET_MTU"
        case .setBackendReqFD: return "SET_BACKEND_REQ_FD"
        case .iotlbMessage: return "IOTLB_MSG"
        case .setVringEndian: return "SET_VRING_ENDIAN"
        case .getConfig: return "GET_CONFIG"
        case .setConfig: return "SET_CONFIG"
        case .getInflightFD: return "GET_INFLIGHT_FD"
        case .setInflightFD: return "SET_INFLIGHT_FD"
        case .resetDevice: return "RESET_DEVICE"
        case .vringKick: return "VRING_KICK"
        case .getMaxMemSlots: return "GET_MAX_MEM_SLOTS"
        case .addMemReg: return "ADD_MEM_REG"
        case .remMemReg: return "REM_MEM_REG"
        case .setStatus: return "SET_STATUS"
        case .getStatus: return "GET_STATUS"
        }
    }
}

/// Header flag bits.
public enum HeaderFlags {
    /// The version field of the flags.
    public static let versionMask: UInt32 = 0x3
    /// The only protocol version.
    public static let version: UInt32 = 0x1
    /// VHOST_USER_REPLY_MASK: the message is a reply.
    public static let reply: UInt32 = 0x4
    /// VHOST_USER_NEED_REPLY_MASK: the sender wants a REPLY_ACK.
    public static let needReply: UInt32 = 0x8
}

/// Virtio and vhost-user feature bits RingFence negotiates.
public enum FeatureBits {
    /// VIRTIO_RING_F_INDIRECT_DESC.
    public static let ringIndirectDescriptors: UInt64 = 1 << 28
    /// VIRTIO_RING_F_EVENT_IDX.
    public static let ringEventIndex: UInt64 = 1 << 29
    /// VHOST_USER_F_PROTOCOL_FEATURES.
    public static let protocolFeatures: UInt64 = 1 << 30
    /// VIRTIO_F_VERSION_1.
    public static let version1: UInt64 = 1 << 32
    /// VIRTIO_F_ACCESS_PLATFORM (never acked).
    public static let accessPlatform: UInt64 = 1 << 33
    /// VIRTIO_F_RING_PACKED.
    public static let ringPacked: UInt64 = 1 << 34
    /// VIRTIO_F_IN_ORDER: the device uses buffers in the order they were made available.
    public static let inOrder: UInt64 = 1 << 35
}

/// VHOST_USER_PROTOCOL_F_* bits.
public struct ProtocolFeatures: OptionSet, Sendable, Hashable {
    /// The bits.
    public let rawValue: UInt64
    /// A set from raw bits.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// VHOST_USER_PROTOCOL_F_MQ.
    public static let multiQueue = ProtocolFeatures(rawValue: 1 << 0)
    /// VHOST_USER_PROTOCOL_F_LOG_SHMFD (never acked).
    public static let logSharedMemory = ProtocolFeatures(rawValue: 1 << 1)
    /// VHOST_USER_PROTOCOL_F_REPLY_ACK.
    public static let replyAck = ProtocolFeatures(rawValue: 1 << 3)
    /// VHOST_USER_PROTOCOL_F_BACKEND_REQ (never acked).
    public static let backendRequest = ProtocolFeatures(rawValue: 1 << 5)
    /// VHOST_USER_PROTOCOL_F_PAGEFAULT (never acked).
    public static let pageFault = ProtocolFeatures(rawValue: 1 << 8)
    /// VHOST_USER_PROTOCOL_F_CONFIG.
    public static let config = ProtocolFeatures(rawValue: 1 << 9)
    /// VHOST_USER_PROTOCOL_F_HOST_NOTIFIER (never acked).
    public static let hostNotifier = ProtocolFeatures(rawValue: 1 << 11)
    /// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (never acked).
    public static let inflightSharedMemory = ProtocolFeatures(rawValue: 1 << 12)
    /// VHOST_USER_PROTOCOL_F_RESET_DEVICE.
    public static let resetDevice = ProtocolFeatures(rawValue: 1 << 13)
    /// VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS.
    public static let configureMemSlots = ProtocolFeatures(rawValue: 1 << 15)
    /// VHOST_USER_PROTOCOL_F_STATUS (never acked).
    public static let status = ProtocolFeatures(rawValue: 1 << 16)
}
