import SharedMemory

/// `blk bench` in verified mode: 4 KiB random requests, `depth` in flight, on the plain
/// transport and through the verified layer, plus the AEAD floor (AES-GCM sealing or
/// opening 4 KiB in a loop on one core), all in the same run. Phases alternate
/// (plain, verified, plain, verified) so drift hits both sides alike.
public struct VerifiedBench {
    public enum Pattern: String, Sendable { case read, write }

    public struct Phase: Sendable {
        public var requests: UInt64 = 0
        public var nanoseconds: UInt64 = 0
        public var errors: UInt64 = 0
        public var microsecondsPerRequest: Double {
            requests == 0 ? 0 : Double(nanoseconds) / Double(requests) / 1000
        }
        public var requestsPerSecond: Double {
            nanoseconds == 0 ? 0 : Double(requests) * 1e9 / Double(nanoseconds)
        }
        mutating func add(_ other: Phase) {
            requests += other.requests
            nanoseconds += other.nanoseconds
            errors += other.errors
        }
    }

    public struct Report: Sendable {
        public var plain = Phase()
        public var verified = Phase()
        public var aeadFloor = Phase()
        /// The verified phases' split (`VerifiedBlockDevice.Timing`).
        public var verifiedSplit = VerifiedBlockDevice.Timing()
        /// Verified cost per request over (plain + AEAD floor); the target is <= 1.25.
        public var ratio: Double {
            let budget = plain.microsecondsPerRequest + aeadFloor.microsecondsPerRequest
            return budget == 0 ? 0 : verified.microsecondsPerRequest / budget
        }
    }

    public var pattern: Pattern
    public var depth: Int
    public var seconds: Double

    public init(pattern: Pattern, depth: Int, seconds: Double) {
        self.pattern = pattern
        self.depth = max(1, min(depth, 64))
        self.seconds = seconds
    }

    /// Runs every phase on `device` (and its transport). The device must be healthy.
    public func run(_ device: VerifiedBlockDevice) -> Report {
        var report = Report()
        report.aeadFloor = aeadFloor(device.sealer, seconds: seconds / 5)
        var rng = SystemRandomNumberGenerator()
        let buffer = UnsafeMutableRawBufferPointer.allocate(
            byteCount: depth * VerifiedLayout.blockSize, alignment: 4096)
        defer { buffer.deallocate() }
        for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: i &* 7) }
        if pattern == .read {
            // Reads of never-written blocks would not touch the device: write them all first.
            var b: UInt64 = 0
            while b < device.blocks && device.failure == nil {
                let n = min(UInt64(depth), device.blocks - b)
                try? device.write(
                    blocks: (0..<n).map { b + $0 },
                    from: UnsafeRawBufferPointer(rebasing: buffer[0..<(Int(n) * VerifiedLayout.blockSize)]))
                b += n
            }
            try? device.flush()
        }
        let before = pattern == .write ? device.writeTiming : device.readTiming
        for _ in 0..<2 {
            report.plain.add(plain(device, buffer: buffer, seconds: seconds * 0.2, rng: &rng))
            report.verified.add(verified(device, buffer: buffer, seconds: seconds * 0.2, rng: &rng))
        }
        let after = pattern == .write ? device.writeTiming : device.readTiming
        report.verifiedSplit = VerifiedBlockDevice.Timing(
            blocks: after.blocks &- before.blocks,
            cryptoNanoseconds: after.cryptoNanoseconds &- before.cryptoNanoseconds,
            transferNanoseconds: after.transferNanoseconds &- before.transferNanoseconds,
            treeNanoseconds: after.treeNanoseconds &- before.treeNanoseconds)
        return report
    }

    func randomBlocks(_ device: VerifiedBlockDevice, rng: inout SystemRandomNumberGenerator) -> [UInt64] {
        var set = Set<UInt64>()
        while set.count < min(depth, Int(device.blocks)) {
            set.insert(UInt64.random(in: 0..<device.blocks, using: &rng))
        }
        return Array(set)
    }

    /// The same requests the verified layer makes (4 KiB at a slot's data) straight on the
    /// transport. Plain writes go to the slot the flushed root does not use (never read
    /// again), so the bench leaves the verified device intact.
    func plain(
        _ device: VerifiedBlockDevice, buffer: UnsafeMutableRawBufferPointer, seconds: Double,
        rng: inout SystemRandomNumberGenerator
    ) -> Phase {
        var phase = Phase()
        if pattern == .write { try? device.flush() }
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        while true {
            let list = randomBlocks(device, rng: &rng)
            let requests = list.enumerated().map { k, b in
                TransportRequest(
                    offset: device.layout.slotOffset(
                        block: b, slot: pattern == .write ? 1 - Int(device.slots[Int(b)]) : Int(device.slots[Int(b)])),
                    buffer: UnsafeMutableRawBufferPointer(
                        rebasing: buffer[(k * VerifiedLayout.blockSize)..<((k + 1) * VerifiedLayout.blockSize)]),
                    write: pattern == .write)
            }
            do { try device.transport.transfer(requests) } catch { phase.errors += 1 }
            phase.requests += UInt64(list.count)
            let now = monotonicNanoseconds()
            if now >= end || phase.errors > 0 {
                phase.nanoseconds = now - start
                return phase
            }
        }
    }

    func verified(
        _ device: VerifiedBlockDevice, buffer: UnsafeMutableRawBufferPointer, seconds: Double,
        rng: inout SystemRandomNumberGenerator
    ) -> Phase {
        var phase = Phase()
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        while true {
            let list = randomBlocks(device, rng: &rng)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(list.count * VerifiedLayout.blockSize)])
            do throws(VerifiedBlockError) {
                if pattern == .write {
                    try device.write(blocks: list, from: UnsafeRawBufferPointer(part))
                } else {
                    try device.read(blocks: list, into: part)
                }
            } catch { phase.errors += 1 }
            phase.requests += UInt64(list.count)
            let now = monotonicNanoseconds()
            if now >= end || phase.errors > 0 {
                phase.nanoseconds = now - start
                return phase
            }
        }
    }

    /// AES-256-GCM seal (writes) or open (reads) of 4 KiB, in a loop on this one core.
    func aeadFloor(_ sealer: BlockSealer, seconds: Double) -> Phase {
        var phase = Phase()
        let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: VerifiedLayout.blockSize, alignment: 64)
        let sealed = UnsafeMutableRawBufferPointer.allocate(byteCount: VerifiedLayout.blockSize, alignment: 64)
        defer {
            plain.deallocate()
            sealed.deallocate()
        }
        plain.initializeMemory(as: UInt8.self, repeating: 7)
        let tag = sealer.seal(UnsafeRawBufferPointer(plain), block: 0, version: 1, into: sealed) ?? []
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        var version: UInt64 = 2
        while true {
            for _ in 0..<64 {
                if pattern == .write {
                    _ = sealer.seal(UnsafeRawBufferPointer(plain), block: 0, version: version, into: sealed)
                    version += 1
                } else if !sealer.open(UnsafeRawBufferPointer(sealed), tag: tag, block: 0, version: 1, into: plain) {
                    phase.errors += 1
                }
            }
            phase.requests += 64
            let now = monotonicNanoseconds()
            if now >= end {
                phase.nanoseconds = now - start
                return phase
            }
        }
    }
}
