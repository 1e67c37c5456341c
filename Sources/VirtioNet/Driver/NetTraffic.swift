import SharedMemory

/// The traffic loops behind `ringfence net ping` and `bench`, as library calls.
public enum NetTraffic {
    /// The EtherType of our test frames (IEEE local experimental).
    public static let etherType: [UInt8] = [0x88, 0xb5]

    /// A test frame: `dst`, `src`, EtherType, then a sequence number and a pattern of it.
    public static func frame(dst: [UInt8], src: [UInt8], size: Int, sequence: UInt64) -> [UInt8] {
        var f = dst + src + etherType
        for i in 0..<8 { f.append(UInt8(truncatingIfNeeded: sequence >> (8 * i))) }
        while f.count < size { f.append(UInt8(truncatingIfNeeded: UInt64(f.count) &* 131 &+ sequence)) }
        return Array(f.prefix(max(size, 14)))
    }

    /// Whether `got` is `sent` coming back: every byte equal, or with the two MAC addresses
    /// swapped (a peer that answers like testpmd's macswap).
    public static func isEcho(_ got: UnsafeRawBufferPointer, of sent: [UInt8]) -> Bool {
        guard got.count == sent.count, sent.count >= 14 else { return false }
        let same = (0..<sent.count).allSatisfy { got[$0] == sent[$0] }
        if same { return true }
        for i in 0..<6 where got[i] != sent[6 + i] || got[6 + i] != sent[i] { return false }
        return (12..<sent.count).allSatisfy { got[$0] == sent[$0] }
    }

    public struct PingResult: Sendable, Equatable {
        public var sent = 0
        public var received = 0
        /// Frames that came back with any byte wrong, or unrelated frames seen.
        public var mismatched = 0
        public var minimumMicroseconds: Double = 0
        public var averageMicroseconds: Double = 0
        public var maximumMicroseconds: Double = 0
    }

    /// Sends `count` frames one at a time and waits (up to `timeout` each) for each to come
    /// back; verifies every byte. Stops at the first frame that does not come back.
    public static func ping(
        _ pair: NetQueuePair, mac: [UInt8], dst: [UInt8], size: Int, count: Int, timeout: Double,
        progress: (Int, Double) -> Void = { _, _ in }
    ) throws(NetError) -> PingResult {
        var r = PingResult()
        let batch = NetFrameBatch(capacity: 1, frameCapacity: max(size, 14))
        let incoming = NetFrameBatch(capacity: 16, frameCapacity: 65536)
        var total = 0.0
        r.minimumMicroseconds = .infinity
        for seq in 0..<count {
            let sent = frame(dst: dst, src: mac, size: size, sequence: UInt64(seq))
            batch.removeAll()
            batch.append(sent)
            let start = monotonicNanoseconds()
            let deadline = Deadline.after(seconds: timeout)
            while try pair.transmit(batch) == 0 {
                guard pair.waitForTransmitRoom(until: deadline) else { return r }
            }
            r.sent += 1
            var back = false
            while !back {
                incoming.removeAll()
                let n = try pair.receive(into: incoming)
                for i in 0..<n {
                    if isEcho(incoming[i], of: sent) { back = true } else { r.mismatched += 1 }
                }
                if !back && n == 0 && !pair.waitForReceive(until: deadline) { break }
            }
            guard back else { break }
            let us = Double(monotonicNanoseconds() - start) / 1000
            r.received += 1
            total += us
            r.minimumMicroseconds = min(r.minimumMicroseconds, us)
            r.maximumMicroseconds = max(r.maximumMicroseconds, us)
            progress(seq, us)
        }
        if r.received == 0 { r.minimumMicroseconds = 0 }
        r.averageMicroseconds = r.received > 0 ? total / Double(r.received) : 0
        return r
    }

    public enum Direction: String, Sendable, CaseIterable {
        case tx, rx, both
    }

    public struct BenchSample: Sendable, Equatable {
        public var seconds: Double = 0
        public var txFrames: UInt64 = 0
        public var rxFrames: UInt64 = 0
        public var txBytes: UInt64 = 0
        public var rxBytes: UInt64 = 0

        public var txMpps: Double { seconds > 0 ? Double(txFrames) / seconds / 1e6 : 0 }
        public var rxMpps: Double { seconds > 0 ? Double(rxFrames) / seconds / 1e6 : 0 }
        /// Frame bytes only (no preamble, gap or CRC), as testpmd's byte counters.
        public var txGbps: Double { seconds > 0 ? Double(txBytes) * 8 / seconds / 1e9 : 0 }
        public var rxGbps: Double { seconds > 0 ? Double(rxBytes) * 8 / seconds / 1e9 : 0 }
    }

    /// testpmd-like: transmits and/or receives as fast as the rings allow for `seconds`,
    /// `batchSize` frames per call (no allocation per frame); `progress` gets each second's
    /// sample, the result is the whole run.
    public static func bench(
        _ pair: NetQueuePair, mac: [UInt8], dst: [UInt8], size: Int, direction: Direction, seconds: Double,
        batchSize: Int = 32, progress: (BenchSample) -> Void = { _ in }
    ) throws(NetError) -> BenchSample {
        let out = NetFrameBatch(capacity: batchSize, frameCapacity: max(size, 14))
        for i in 0..<batchSize { out.append(frame(dst: dst, src: mac, size: size, sequence: UInt64(i))) }
        let incoming = NetFrameBatch(capacity: batchSize, frameCapacity: 65536)
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        var nextReport = start + 1_000_000_000
        var total = BenchSample()
        var second = BenchSample()
        var now = start
        var idle = 0
        while now < end {
            var worked = false
            if direction != .rx {
                let n = try pair.transmit(out)
                if n > 0 {
                    worked = true
                    second.txFrames &+= UInt64(n)
                    second.txBytes &+= UInt64(n * out[0].count)
                }
            }
            if direction != .tx {
                incoming.removeAll()
                let n = try pair.receive(into: incoming)
                if n > 0 {
                    worked = true
                    second.rxFrames &+= UInt64(n)
                    for i in 0..<n { second.rxBytes &+= UInt64(incoming[i].count) }
                }
            }
            idle = worked ? 0 : idle + 1
            if idle > 1024 {
                // Nothing moves: block briefly instead of burning the core.
                let until = Deadline.after(nanoseconds: 1_000_000)
                if direction == .tx {
                    _ = pair.waitForTransmitRoom(until: until)
                } else {
                    _ = pair.waitForReceive(until: until)
                }
                idle = 0
            }
            now = monotonicNanoseconds()
            if now >= nextReport || now >= end {
                second.seconds = Double(now - (nextReport - 1_000_000_000)) / 1e9
                progress(second)
                total.txFrames &+= second.txFrames
                total.rxFrames &+= second.rxFrames
                total.txBytes &+= second.txBytes
                total.rxBytes &+= second.rxBytes
                second = BenchSample()
                nextReport = now + 1_000_000_000
            }
        }
        total.seconds = Double(now - start) / 1e9
        return total
    }
}
