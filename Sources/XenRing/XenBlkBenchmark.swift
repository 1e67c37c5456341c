import SharedMemory

/// Figures from one benchmark run.
public struct XenBenchReport: Sendable {
    public var requests: Int
    public var bytes: Int
    public var seconds: Double
    public var errors: Int
    public var requestsPerSecond: Double { seconds > 0 ? Double(requests) / seconds : 0 }
    public var mebibytesPerSecond: Double { seconds > 0 ? Double(bytes) / seconds / 1_048_576 : 0 }

    public init(requests: Int, bytes: Int, seconds: Double, errors: Int) {
        self.requests = requests
        self.bytes = bytes
        self.seconds = seconds
        self.errors = errors
    }
}

extension XenBlkFrontendDevice {
    /// Keeps `depth` requests of `blockSize` bytes in flight for `seconds` (reads, or
    /// writes), cycling over the disk, through the same hardened path as `read`/`write`.
    public func benchmark(seconds: Double, depth: Int = 16, write: Bool = false, blockSize: Int = 4096)
        throws(XenBlkError) -> XenBenchReport
    {
        let depth = max(1, min(depth, front.ringSize))
        let blockSectors = UInt64(blockSize / BlkifLayout.sectorSize)
        let blocks = max(1, info.sectors / max(1, blockSectors))
        let buffers = UnsafeMutableRawBufferPointer.allocate(byteCount: depth * blockSize, alignment: 4096)
        defer { buffers.deallocate() }
        for i in 0..<buffers.count { buffers[i] = UInt8(truncatingIfNeeded: i &* 13) }
        // Buffer `slot` (the request's token) lives at `base + slot * blockSize`.
        guard let base = buffers.baseAddress else {
            return XenBenchReport(requests: 0, bytes: 0, seconds: 0, errors: 0)
        }
        var next: UInt64 = 0
        var report = XenBenchReport(requests: 0, bytes: 0, seconds: 0, errors: 0)
        for slot in 0..<depth {
            try post(slot, base: base, blockSize: blockSize, sector: (next % blocks) &* blockSectors, write: write)
            next &+= 1
        }
        kick()
        var inFlight = depth
        let start = monotonicNanoseconds()
        let end = start &+ UInt64(max(0, seconds) * 1e9)
        var stopping = false
        var woke = false
        var batches = 0
        // A deadline only while we wait (R5); reading the clock per completion would cost
        // more than the checks this loop measures.
        var deadline: Deadline?
        let timeoutNanoseconds = UInt64(max(0, min(timeout, 3600)) * 1e9)
        // The hot loop allocates nothing: completions are consumed one by one, and each
        // slot is posted again as soon as it completes.
        while inFlight > 0 {
            var progressed = false
            while let c = try nextCompletionOrDisable() {
                progressed = true
                inFlight &-= 1
                report.requests &+= 1
                if c.status != .okay { report.errors &+= 1 }
                if !stopping {
                    let slot = Int(truncatingIfNeeded: c.token)
                    try post(
                        slot, base: base, blockSize: blockSize, sector: (next % blocks) &* blockSectors, write: write)
                    next &+= 1
                    inFlight &+= 1
                }
            }
            if woke {
                events.noteWake(productive: progressed)
                woke = false
            }
            if progressed {
                kick()
                deadline = nil
                batches &+= 1
                if !stopping && batches & 7 == 0 && monotonicNanoseconds() >= end { stopping = true }
                continue
            }
            if front.enableNotifications() { continue }
            let now = monotonicNanoseconds()
            if !stopping && now >= end { stopping = true }
            let until = deadline ?? Deadline(uptimeNanoseconds: now &+ timeoutNanoseconds)
            deadline = until
            try checkDeadline(until)
            woke = events.wait(until: until)
        }
        report.bytes = report.requests &* blockSize
        report.seconds = Double(monotonicNanoseconds() &- start) / 1e9
        return report
    }

    /// Posts buffer `slot` (token `slot`) through the hardened submit path.
    @inline(__always)
    func post(_ slot: Int, base: UnsafeMutableRawPointer, blockSize: Int, sector: UInt64, write: Bool)
        throws(XenBlkError)
    {
        let buffer = UnsafeMutableRawBufferPointer(start: base + slot * blockSize, count: blockSize)
        do {
            if write {
                try front.submitWrite(sector: sector, from: UnsafeRawBufferPointer(buffer), token: UInt64(slot))
            } else {
                try front.submitRead(sector: sector, into: buffer, token: UInt64(slot))
            }
        } catch { throw submitError(error) }
    }
}
