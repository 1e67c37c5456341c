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
        var next: UInt64 = 0
        func post(_ slot: Int) throws(XenBlkError) {
            let sector = (next % blocks) * blockSectors
            next &+= 1
            let b = UnsafeMutableRawBufferPointer(rebasing: buffers[(slot * blockSize)..<((slot + 1) * blockSize)])
            do {
                if write {
                    try front.submitWrite(sector: sector, from: UnsafeRawBufferPointer(b), token: UInt64(slot))
                } else {
                    try front.submitRead(sector: sector, into: b, token: UInt64(slot))
                }
            } catch { throw submitError(error) }
        }
        var report = XenBenchReport(requests: 0, bytes: 0, seconds: 0, errors: 0)
        for slot in 0..<depth { try post(slot) }
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
        // The hot loop allocates nothing: completions are consumed one by one.
        while inFlight > 0 {
            var progressed = false
            while let c = try nextCompletionOrDisable() {
                progressed = true
                inFlight -= 1
                report.requests += 1
                report.bytes += blockSize
                if c.status != .okay { report.errors += 1 }
                if !stopping {
                    try post(Int(c.token))
                    inFlight += 1
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
        report.seconds = Double(monotonicNanoseconds() &- start) / 1e9
        return report
    }
}
