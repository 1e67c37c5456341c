#if RINGFENCE_SPLIT_PROBE
internal import CRingFence

/// The latency split of the block driver's closed loop (issue 19; benchmarks only, built
/// with `-Xswiftc -DRINGFENCE_SPLIT_PROBE -Xcc -DRINGFENCE_SPLIT_PROBE`): `BlockQueue`
/// stamps the TSC when `poll` sees a completion and around the kick's eventfd write
/// (`rf_split_probe.h`). One probe per process, for one queue on one thread.
public enum SplitProbe {
    /// One part of the request's round trip: its sum, count and histogram in TSC ticks.
    public struct Part: Sendable {
        public var sumTicks: UInt64 = 0
        public var count: UInt64 = 0
        /// Bucket i holds values in [i, i+1) * `bucketTicks` (the last one everything above).
        public var histogram: [UInt32] = []
        public init(sumTicks: UInt64 = 0, count: UInt64 = 0, histogram: [UInt32] = []) {
            self.sumTicks = sumTicks
            self.count = count
            self.histogram = histogram
        }
    }

    public struct Report: Sendable {
        public var turnaround = Part()
        public var write = Part()
        public var device = Part()
        public var ticksPerNanosecond = 1.0
        public var bucketTicks = 1
        public init() {}
    }

    /// Clears the probe and starts recording.
    public static func arm() {
        let p = rf_split_driver()!
        p.pointee = rf_split_probe()
        rf_split_arm(p)
    }

    /// Stops recording (the report covers arm to disarm).
    public static func disarm() { rf_split_disarm(rf_split_driver()) }

    public static func report() -> Report {
        let p = rf_split_driver()!
        var r = Report()
        func part(_ q: UnsafeMutablePointer<rf_split_part>) -> Part {
            Part(
                sumTicks: q.pointee.sum, count: q.pointee.count,
                histogram: withUnsafeBytes(of: &q.pointee.hist) { Array($0.bindMemory(to: UInt32.self)) })
        }
        withUnsafeMutablePointer(to: &p.pointee.turnaround) { r.turnaround = part($0) }
        withUnsafeMutablePointer(to: &p.pointee.write) { r.write = part($0) }
        withUnsafeMutablePointer(to: &p.pointee.device) { r.device = part($0) }
        let ns = Double(p.pointee.ns1 &- p.pointee.ns0)
        r.ticksPerNanosecond = ns > 0 ? Double(p.pointee.tsc1 &- p.pointee.tsc0) / ns : 1
        r.bucketTicks = 1 << Int(RF_SPLIT_SHIFT)
        return r
    }

    @inline(__always) static func seen() { rf_split_seen(rf_split_driver()) }
    @inline(__always) static func kickBegin() { rf_split_kick_begin(rf_split_driver()) }
    @inline(__always) static func kicked() { rf_split_kicked(rf_split_driver()) }
}
#endif
