import Foundation
public import Histogram
public import RingFenceResults

/// A benchmark result for tools (`--json`), encoded from this type, never from strings
/// (issue 19). Field names are fio's where the field means the same: `iops`, `bw` (KiB/s),
/// `io_bytes`, `total_ios`, `runtime` (ms), `lat_ns` with fio's `percentile` keys.
public struct BlockBenchResult: Codable, Sendable, Equatable {
    /// Completion latency in nanoseconds, as fio's `lat_ns` (the one type every `--json`
    /// uses, `RingFenceResults.LatencyNs`).
    public typealias Latency = LatencyNs

    public var rw: String
    public var bs: Int
    public var iodepth: Int
    public var queues: Int
    /// Milliseconds measured.
    public var runtime: Int
    public var totalIos: Int
    public var ioBytes: Int
    public var iops: Double
    /// KiB per second.
    public var bw: Int
    public var latNs: Latency?
    /// The first failure, or nil.
    public var error: String?

    enum CodingKeys: String, CodingKey {
        case rw, bs, iodepth, queues, runtime, iops, bw, error
        case totalIos = "total_ios"
        case ioBytes = "io_bytes"
        case latNs = "lat_ns"
    }

    public init(
        rw: String, bs: Int, iodepth: Int, queues: Int, seconds: Double, ios: Int, latencies: Histogram<UInt64>?,
        error: String?
    ) {
        self.rw = rw
        self.bs = bs
        self.iodepth = iodepth
        self.queues = queues
        self.runtime = Int((seconds * 1000).rounded())
        self.totalIos = ios
        self.ioBytes = ios * bs
        self.iops = seconds > 0 ? Double(ios) / seconds : 0
        self.bw = seconds > 0 ? Int(Double(ios * bs) / 1024 / seconds) : 0
        self.latNs = latencies.flatMap { $0.totalCount > 0 ? Latency($0) : nil }
        self.error = error
    }

    /// Every key always present (`lat_ns` and `error` as null when absent): stable for tools.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(rw, forKey: .rw)
        try c.encode(bs, forKey: .bs)
        try c.encode(iodepth, forKey: .iodepth)
        try c.encode(queues, forKey: .queues)
        try c.encode(runtime, forKey: .runtime)
        try c.encode(totalIos, forKey: .totalIos)
        try c.encode(ioBytes, forKey: .ioBytes)
        try c.encode(iops, forKey: .iops)
        try c.encode(bw, forKey: .bw)
        try c.encode(latNs, forKey: .latNs)
        try c.encode(error, forKey: .error)
    }

    /// One line of JSON, keys sorted (stable for tools and diffs).
    public var json: String {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? e.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
    }
}

extension LatencyNs {
    /// From a histogram of nanoseconds.
    public init(_ h: Histogram<UInt64>) {
        self.init(
            min: h.min, max: h.max, mean: h.mean,
            percentile: Dictionary(
                uniqueKeysWithValues: [50.0, 90.0, 99.0, 99.9].map {
                    (String(format: "%.6f", $0), h.valueAtPercentile($0))
                }))
    }
}
