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
        guard let p = rf_split_driver() else { return }
        p.pointee = rf_split_probe()
        rf_split_arm(p)
    }

    /// Stops recording (the report covers arm to disarm).
    public static func disarm() { rf_split_disarm(rf_split_driver()) }

    /// This driver's probe.
    public static func report() -> Report {
        guard let p = rf_split_driver() else { return Report() }
        return report(of: UnsafeRawPointer(p))
    }

    /// Any `struct rf_split_probe` (`rf_split_probe.h`; the C poller in Benchmarks/ keeps
    /// one in its result), read into a report.
    public static func report(of probe: UnsafeRawPointer) -> Report {
        var p = probe.load(as: rf_split_probe.self)
        func part(_ q: inout rf_split_part) -> Part {
            Part(
                sumTicks: q.sum, count: q.count,
                histogram: withUnsafeBytes(of: &q.hist) { Array($0.bindMemory(to: UInt32.self)) })
        }
        var r = Report()
        r.turnaround = part(&p.turnaround)
        r.write = part(&p.write)
        r.device = part(&p.device)
        let ns = Double(p.ns1 &- p.ns0)
        r.ticksPerNanosecond = ns > 0 ? Double(p.tsc1 &- p.tsc0) / ns : 1
        r.bucketTicks = 1 << Int(RF_SPLIT_SHIFT)
        return r
    }

    @inline(__always) static func seen() { rf_split_seen(rf_split_driver()) }
    @inline(__always) static func kickBegin() { rf_split_kick_begin(rf_split_driver()) }
    @inline(__always) static func kicked() { rf_split_kicked(rf_split_driver()) }
}
#endif
