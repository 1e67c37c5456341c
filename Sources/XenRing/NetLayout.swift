/// `io/netif.h`: the tx ring carries 12-byte `netif_tx_request`s (and 8-byte
/// `netif_extra_info` in request slots) answered by 4-byte `netif_tx_response`s; the rx
/// ring carries 8-byte `netif_rx_request`s answered by 8-byte `netif_rx_response`s (and
/// `netif_extra_info` in response slots). Offsets are checked against the C header by
/// `NetLayoutTests`.
public enum NetifLayout {
    public static let txSlotSize = 12
    public static let txRequestSize = 12
    public static let txRequestGrantRef = 0
    public static let txRequestOffset = 4
    public static let txRequestFlags = 6
    public static let txRequestId = 8
    public static let txRequestSize16 = 10
    public static let txResponseSize = 4
    public static let txResponseId = 0
    public static let txResponseStatus = 2

    public static let rxSlotSize = 8
    public static let rxRequestSize = 8
    public static let rxRequestId = 0
    public static let rxRequestGrantRef = 4
    public static let rxResponseSize = 8
    public static let rxResponseId = 0
    public static let rxResponseOffset = 2
    public static let rxResponseFlags = 4
    public static let rxResponseStatus = 6

    /// `netif_extra_info`: type, flags, then an 6-byte union.
    public static let extraSize = 8
    public static let extraType = 0
    public static let extraFlags = 1
    public static let gsoSize = 2
    public static let gsoType = 4
    public static let gsoPad = 5
    public static let gsoFeatures = 6
    public static let mcastAddress = 2
    public static let hashType = 2
    public static let hashAlgorithm = 3
    public static let hashValue = 4

    /// Slots in a one-page tx ring (256) and rx ring (256).
    public static let txRingSize = SharedRingLayout.slotCount(pages: 1, slotSize: txSlotSize)
    public static let rxRingSize = SharedRingLayout.slotCount(pages: 1, slotSize: rxSlotSize)

    /// `XEN_NETIF_MAX_TX_SIZE`: a frame's size field is 16 bits.
    public static let maxFrameSize = 0xFFFF
    /// `XEN_NETIF_NR_SLOTS_MIN`: the slots a backend must accept for one frame; ours
    /// refuse chains longer than this (R5, "too many slots").
    public static let maxSlotsPerFrame = 18
    /// One extra-info segment per type at most (GSO, MCAST_ADD, MCAST_DEL, HASH).
    public static let maxExtras = Int(NetExtraType.max.rawValue) - 1
    /// The smallest frame a backend forwards (`ETH_HLEN`).
    public static let minimumFrameSize = 14
}

/// `NETTXF_*` and `NETRXF_*` flag bits.
public enum NetFlags {
    public static let txChecksumBlank: UInt16 = 1 << 0
    public static let txDataValidated: UInt16 = 1 << 1
    public static let txMoreData: UInt16 = 1 << 2
    public static let txExtraInfo: UInt16 = 1 << 3
    public static let rxDataValidated: UInt16 = 1 << 0
    public static let rxChecksumBlank: UInt16 = 1 << 1
    public static let rxMoreData: UInt16 = 1 << 2
    public static let rxExtraInfo: UInt16 = 1 << 3
    public static let rxGSOPrefix: UInt16 = 1 << 4
    /// `XEN_NETIF_EXTRA_FLAG_MORE`: another extra-info segment follows.
    public static let extraMore: UInt8 = 1 << 0
}

/// `XEN_NETIF_EXTRA_TYPE_*`.
public enum NetExtraType: UInt8, Sendable {
    case none = 0
    case gso = 1
    case multicastAdd = 2
    case multicastDelete = 3
    case hash = 4
    case max = 5
}

/// `XEN_NETIF_GSO_TYPE_*` (NONE is not a valid GSO segment).
public enum NetGSOType: UInt8, Sendable {
    case tcpv4 = 1
    case tcpv6 = 2
}

/// `NETIF_RSP_*`: the only statuses accepted in a tx response, and the negative ones in an
/// rx response (a non-negative rx status is the slot's byte count).
public enum NetStatus: Int16, Sendable {
    case dropped = -2
    case error = -1
    case okay = 0
    /// The response to an extra-info slot.
    case null = 1
}
