/// What `ringfence ... --json` prints, one `Codable` type per command (issue 19): tools
/// decode these, so field names are stable, snake_case, and fio's where a field means the
/// same (`iops`, `bw` in KiB/s, `runtime` in ms, `lat_ns` with `percentile` keys). Block
/// benchmarks print `BlockBench.BlockBenchResult`. Every key is always present (`error`
/// as null when there was none).

/// Latencies in nanoseconds, as fio's `lat_ns`: min, max, mean and percentiles keyed
/// "50.000000", "90.000000", "99.000000", "99.900000".
public struct LatencyNs: Codable, Sendable, Equatable {
    public var min: UInt64
    public var max: UInt64
    public var mean: Double
    public var percentile: [String: UInt64]

    public init(min: UInt64, max: UInt64, mean: Double, percentile: [String: UInt64]) {
        self.min = min
        self.max = max
        self.mean = mean
        self.percentile = percentile
    }

    /// From samples in nanoseconds (nearest-rank percentiles); nil when there are none.
    public init?(samples: [UInt64]) {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        func rank(_ p: Double) -> UInt64 {
            let i = Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1
            return sorted[Swift.max(0, Swift.min(sorted.count - 1, i))]
        }
        self.init(
            min: sorted[0], max: sorted[sorted.count - 1],
            mean: Double(sorted.reduce(0.0) { $0 + Double($1) }) / Double(sorted.count),
            percentile: [
                "50.000000": rank(50), "90.000000": rank(90), "99.000000": rank(99), "99.900000": rank(99.9),
            ])
    }
}

/// `ringfence blk info --json`: the geometry after the driver validated it.
public struct BlkInfoResult: Codable, Sendable, Equatable {
    /// Bytes.
    public var capacity: UInt64
    /// 512-byte sectors.
    public var sectors: UInt64
    public var blockSize: Int
    /// Queues in use.
    public var queues: Int
    /// num_queues as the device announced it (display only).
    public var deviceQueues: Int
    public var segMax: Int
    /// Bytes; 0 = no limit.
    public var sizeMax: Int
    /// Bytes one request carries (larger transfers are split).
    public var maxTransfer: Int
    public var readOnly: Bool
    public var flush: Bool
    public var discard: Bool
    /// Bytes; 0 without discard.
    public var maxDiscard: UInt64
    public var writeZeroes: Bool
    /// Bytes; 0 without write zeroes.
    public var maxWriteZeroes: UInt64
    /// Negotiated feature bits.
    public var features: UInt64
    /// GET_ID, or null when the device has none.
    public var serial: String?

    enum CodingKeys: String, CodingKey {
        case capacity, sectors, queues, flush, discard, features, serial
        case blockSize = "block_size"
        case deviceQueues = "device_queues"
        case segMax = "seg_max"
        case sizeMax = "size_max"
        case maxTransfer = "max_transfer"
        case readOnly = "read_only"
        case maxDiscard = "max_discard"
        case writeZeroes = "write_zeroes"
        case maxWriteZeroes = "max_write_zeroes"
    }

    public init(
        capacity: UInt64, blockSize: Int, queues: Int, deviceQueues: Int, segMax: Int, sizeMax: Int, maxTransfer: Int,
        readOnly: Bool, flush: Bool, discard: Bool, maxDiscard: UInt64, writeZeroes: Bool, maxWriteZeroes: UInt64,
        features: UInt64, serial: String?
    ) {
        self.capacity = capacity
        self.sectors = capacity / 512
        self.blockSize = blockSize
        self.queues = queues
        self.deviceQueues = deviceQueues
        self.segMax = segMax
        self.sizeMax = sizeMax
        self.maxTransfer = maxTransfer
        self.readOnly = readOnly
        self.flush = flush
        self.discard = discard
        self.maxDiscard = maxDiscard
        self.writeZeroes = writeZeroes
        self.maxWriteZeroes = maxWriteZeroes
        self.features = features
        self.serial = serial
    }

    // Every key is always present: `serial` as null when the device has none.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(capacity, forKey: .capacity)
        try c.encode(sectors, forKey: .sectors)
        try c.encode(blockSize, forKey: .blockSize)
        try c.encode(queues, forKey: .queues)
        try c.encode(deviceQueues, forKey: .deviceQueues)
        try c.encode(segMax, forKey: .segMax)
        try c.encode(sizeMax, forKey: .sizeMax)
        try c.encode(maxTransfer, forKey: .maxTransfer)
        try c.encode(readOnly, forKey: .readOnly)
        try c.encode(flush, forKey: .flush)
        try c.encode(discard, forKey: .discard)
        try c.encode(maxDiscard, forKey: .maxDiscard)
        try c.encode(writeZeroes, forKey: .writeZeroes)
        try c.encode(maxWriteZeroes, forKey: .maxWriteZeroes)
        try c.encode(features, forKey: .features)
        try c.encode(serial, forKey: .serial)
    }
}

/// `ringfence net info --json`: the config after the driver validated it.
public struct NetInfoResult: Codable, Sendable, Equatable {
    /// aa:bb:cc:dd:ee:ff.
    public var mac: String
    /// The device offered no usable MAC: `mac` is a random, locally administered one.
    public var macReplaced: Bool
    public var mtu: Int
    /// The largest frame either side may send, bytes.
    public var maxFrame: Int
    public var linkUp: Bool
    /// Queue pairs in use.
    public var queuePairs: Int
    public var maxQueuePairs: Int
    /// "split" or "packed".
    public var ring: String
    public var mergeableRxBuffers: Bool
    public var controlQueue: Bool
    /// CTRL_VQ acked for multiqueue but the control queue kept inside the driver (a
    /// back-end without a config space, as DPDK's vhost): pairs enabled with SET_VRING_ENABLE.
    public var controlQueuePrivate: Bool
    /// Negotiated feature bits.
    public var features: UInt64

    enum CodingKeys: String, CodingKey {
        case mac, mtu, ring, features
        case controlQueuePrivate = "control_queue_private"
        case macReplaced = "mac_replaced"
        case maxFrame = "max_frame"
        case linkUp = "link_up"
        case queuePairs = "queue_pairs"
        case maxQueuePairs = "max_queue_pairs"
        case mergeableRxBuffers = "mergeable_rx_buffers"
        case controlQueue = "control_queue"
    }

    public init(
        mac: String, macReplaced: Bool, mtu: Int, maxFrame: Int, linkUp: Bool, queuePairs: Int, maxQueuePairs: Int,
        ring: String, mergeableRxBuffers: Bool, controlQueue: Bool, controlQueuePrivate: Bool, features: UInt64
    ) {
        self.mac = mac
        self.macReplaced = macReplaced
        self.mtu = mtu
        self.maxFrame = maxFrame
        self.linkUp = linkUp
        self.queuePairs = queuePairs
        self.maxQueuePairs = maxQueuePairs
        self.ring = ring
        self.mergeableRxBuffers = mergeableRxBuffers
        self.controlQueue = controlQueue
        self.controlQueuePrivate = controlQueuePrivate
        self.features = features
    }
}

/// `ringfence xen-blk info --json`.
public struct XenBlkInfoResult: Codable, Sendable, Equatable {
    /// Bytes.
    public var capacity: UInt64
    public var sectors: UInt64
    public var sectorSize: Int
    public var readOnly: Bool
    public var flush: Bool
    public var discard: Bool
    public var ringSlots: Int
    /// Bytes one request carries (larger transfers are split).
    public var maxTransfer: Int

    enum CodingKeys: String, CodingKey {
        case capacity, sectors, flush, discard
        case sectorSize = "sector_size"
        case readOnly = "read_only"
        case ringSlots = "ring_slots"
        case maxTransfer = "max_transfer"
    }

    public init(
        capacity: UInt64, sectors: UInt64, sectorSize: Int, readOnly: Bool, flush: Bool, discard: Bool,
        ringSlots: Int, maxTransfer: Int
    ) {
        self.capacity = capacity
        self.sectors = sectors
        self.sectorSize = sectorSize
        self.readOnly = readOnly
        self.flush = flush
        self.discard = discard
        self.ringSlots = ringSlots
        self.maxTransfer = maxTransfer
    }
}

/// `ringfence xen-net info --json`.
public struct XenNetInfoResult: Codable, Sendable, Equatable {
    public var mac: String
    public var rxCopy: Bool
    public var sg: Bool
    public var gsoTcpv4: Bool
    public var maxQueues: Int
    public var txRing: Int
    public var rxRing: Int
    public var rxPosted: Int
    public var txPages: Int

    enum CodingKeys: String, CodingKey {
        case mac, sg
        case rxCopy = "rx_copy"
        case gsoTcpv4 = "gso_tcpv4"
        case maxQueues = "max_queues"
        case txRing = "tx_ring"
        case rxRing = "rx_ring"
        case rxPosted = "rx_posted"
        case txPages = "tx_pages"
    }

    public init(
        mac: String, rxCopy: Bool, sg: Bool, gsoTcpv4: Bool, maxQueues: Int, txRing: Int, rxRing: Int, rxPosted: Int,
        txPages: Int
    ) {
        self.mac = mac
        self.rxCopy = rxCopy
        self.sg = sg
        self.gsoTcpv4 = gsoTcpv4
        self.maxQueues = maxQueues
        self.txRing = txRing
        self.rxRing = rxRing
        self.rxPosted = rxPosted
        self.txPages = txPages
    }
}

/// `ringfence xen-net ping --json`: frames sent, returned, wrong; round trips in ns.
public struct PingResult: Codable, Sendable, Equatable {
    public var sent: Int
    public var received: Int
    public var mismatched: Int
    /// Frame bytes.
    public var size: Int
    /// Round-trip times, nil when nothing came back.
    public var latNs: LatencyNs?

    enum CodingKeys: String, CodingKey {
        case sent, received, mismatched, size
        case latNs = "lat_ns"
    }

    public init(sent: Int, received: Int, mismatched: Int, size: Int, latNs: LatencyNs?) {
        self.sent = sent
        self.received = received
        self.mismatched = mismatched
        self.size = size
        self.latNs = latNs
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(sent, forKey: .sent)
        try c.encode(received, forKey: .received)
        try c.encode(mismatched, forKey: .mismatched)
        try c.encode(size, forKey: .size)
        try c.encode(latNs, forKey: .latNs)
    }
}

/// `ringfence net bench --json` and `ringfence xen-net bench --json`: frames and rates
/// each way (Mpps, Gbit/s of frame bytes, as testpmd counts them).
public struct NetBenchResult: Codable, Sendable, Equatable {
    /// "tx", "rx" or "both".
    public var direction: String
    /// Frame bytes.
    public var size: Int
    /// "split", "packed" or "xen".
    public var ring: String
    /// Frames in flight (xen-net) or per call (net).
    public var depth: Int
    /// Milliseconds measured.
    public var runtime: Int
    public var txFrames: UInt64
    public var rxFrames: UInt64
    /// Frames the device failed (xen-net; 0 for net).
    public var txFailed: UInt64
    public var txMpps: Double
    public var rxMpps: Double
    public var txGbps: Double
    public var rxGbps: Double
    /// The failure that ended the run, or nil.
    public var error: String?

    enum CodingKeys: String, CodingKey {
        case direction, size, ring, depth, runtime, error
        case txFrames = "tx_frames"
        case rxFrames = "rx_frames"
        case txFailed = "tx_failed"
        case txMpps = "tx_mpps"
        case rxMpps = "rx_mpps"
        case txGbps = "tx_gbps"
        case rxGbps = "rx_gbps"
    }

    public init(
        direction: String, size: Int, ring: String, depth: Int, seconds: Double, txFrames: UInt64, rxFrames: UInt64,
        txFailed: UInt64 = 0, error: String? = nil
    ) {
        self.direction = direction
        self.size = size
        self.ring = ring
        self.depth = depth
        self.runtime = Int((seconds * 1000).rounded())
        self.txFrames = txFrames
        self.rxFrames = rxFrames
        self.txFailed = txFailed
        let s = seconds > 0 ? seconds : 1
        self.txMpps = seconds > 0 ? Double(txFrames) / s / 1e6 : 0
        self.rxMpps = seconds > 0 ? Double(rxFrames) / s / 1e6 : 0
        self.txGbps = seconds > 0 ? Double(txFrames) * Double(size) * 8 / s / 1e9 : 0
        self.rxGbps = seconds > 0 ? Double(rxFrames) * Double(size) * 8 / s / 1e9 : 0
        self.error = error
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(direction, forKey: .direction)
        try c.encode(size, forKey: .size)
        try c.encode(ring, forKey: .ring)
        try c.encode(depth, forKey: .depth)
        try c.encode(runtime, forKey: .runtime)
        try c.encode(txFrames, forKey: .txFrames)
        try c.encode(rxFrames, forKey: .rxFrames)
        try c.encode(txFailed, forKey: .txFailed)
        try c.encode(txMpps, forKey: .txMpps)
        try c.encode(rxMpps, forKey: .rxMpps)
        try c.encode(txGbps, forKey: .txGbps)
        try c.encode(rxGbps, forKey: .rxGbps)
        try c.encode(error, forKey: .error)
    }
}

/// `ringfence fs bench --json`: operations per second of each measurement.
public struct FsBenchResult: Codable, Sendable, Equatable {
    public var statOps: Double
    public var lookupOps: Double
    /// 4 KiB random reads of one file, per second (fio's iops of that job).
    public var randread4kOps: Double
    public var seqread1mMibS: Double
    /// Milliseconds per measurement.
    public var runtime: Int

    enum CodingKeys: String, CodingKey {
        case runtime
        case statOps = "stat_ops"
        case lookupOps = "lookup_ops"
        case randread4kOps = "randread_4k_ops"
        case seqread1mMibS = "seqread_1m_mib_s"
    }

    public init(statOps: Double, lookupOps: Double, randread4kOps: Double, seqread1mMibS: Double, seconds: Double) {
        self.statOps = statOps
        self.lookupOps = lookupOps
        self.randread4kOps = randread4kOps
        self.seqread1mMibS = seqread1mMibS
        self.runtime = Int((seconds * 1000).rounded())
    }
}
