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
