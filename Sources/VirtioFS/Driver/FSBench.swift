import SharedMemory

/// The one fs benchmark loop (`ringfence fs bench`, the serve-fs vs virtiofsd comparison):
/// metadata operations per second (GETATTR, LOOKUP with its FORGET), 4 KiB random reads
/// and 1 MiB sequential reads of one file, each for a fixed time.
public struct FSBenchResult: Sendable, Equatable {
    public var statPerSecond: Double = 0
    public var lookupPerSecond: Double = 0
    public var randomRead4KPerSecond: Double = 0
    public var sequentialReadMiBPerSecond: Double = 0

    public init() {}

    public var json: String {
        func f(_ v: Double) -> String {
            v.isFinite && abs(v) < 1e15 ? "\(Double(Int64((v * 10).rounded())) / 10)" : "0"
        }
        return "{\"stat_ops\": \(f(statPerSecond)), \"lookup_ops\": \(f(lookupPerSecond)), "
            + "\"randread_4k_ops\": \(f(randomRead4KPerSecond)), \"seqread_1m_mib_s\": \(f(sequentialReadMiBPerSecond))}"
    }
}

public enum FSBench {
    /// Runs the four measurements for `seconds` each against `path` (a regular file of at
    /// least 1 MiB, created with `prepare` when missing).
    public static func run(
        _ fs: VirtioFSDriver, path: String, fileSize: Int = 64 << 20, seconds: Double = 2,
        progress: ((String) -> Void)? = nil
    ) throws(FSError) -> FSBenchResult {
        var result = FSBenchResult()
        let size: Int64
        if let a = try? fs.stat(path), a.type == .regular, a.size >= 1 << 20 {
            size = a.size
        } else {
            progress?("creating \(path) (\(fileSize >> 20) MiB)")
            var bytes = [UInt8](repeating: 0, count: fileSize)
            var x: UInt64 = 0x9e37_79b9_7f4a_7c15
            for i in stride(from: 0, to: bytes.count, by: 8) {
                x ^= x << 13
                x ^= x >> 7
                x ^= x << 17
                bytes[i] = UInt8(truncatingIfNeeded: x)
            }
            try fs.writeFile(path, bytes: bytes)
            size = Int64(fileSize)
        }
        return try fs.withParent(path) { (parent, name) throws(FSError) in
            let file = try fs.lookup(parent: parent, name: name)
            defer { try? fs.forget(file.nodeID) }
            progress?("stat")
            result.statPerSecond = try timed(seconds) { () throws(FSError) in
                _ = try fs.getAttributes(file.nodeID)
            }
            progress?("lookup")
            result.lookupPerSecond = try timed(seconds) { () throws(FSError) in
                let e = try fs.lookup(parent: parent, name: name)
                try fs.forget(e.nodeID)
            }
            let handle = try fs.open(file.nodeID)
            defer { try? fs.release(handle) }
            // Reads land in one reused buffer (`read(_:at:into:)`: one copy out of the
            // bounce buffer, no allocation), so what is timed is the device's part and the
            // ring, not the driver's allocator and page faults.
            let chunk = min(1 << 20, fs.info.maxRead)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { buffer.deallocate() }
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            progress?("4 KiB random reads")
            let blocks = UInt64(size / 4096)
            var x: UInt64 = 0x2545_f491_4f6c_dd1d
            let block = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<4096])
            result.randomRead4KPerSecond = try timed(seconds) { () throws(FSError) in
                x ^= x << 13
                x ^= x >> 7
                x ^= x << 17
                _ = try fs.read(handle, at: (x % blocks) * 4096, into: block)
            }
            progress?("1 MiB sequential reads")
            var offset: UInt64 = 0
            let perSecond = try timed(seconds) { () throws(FSError) in
                if offset + UInt64(chunk) > UInt64(size) { offset = 0 }
                _ = try fs.read(handle, at: offset, into: buffer)
                offset += UInt64(chunk)
            }
            result.sequentialReadMiBPerSecond = perSecond * Double(chunk) / Double(1 << 20)
            return result
        }
    }

    /// Calls `body` until `seconds` passed; returns calls per second.
    static func timed(_ seconds: Double, _ body: () throws(FSError) -> Void) throws(FSError) -> Double {
        let start = monotonicNanoseconds()
        let end = start + UInt64(seconds * 1e9)
        var n = 0
        var now = start
        while now < end {
            for _ in 0..<16 { try body() }
            n += 16
            now = monotonicNanoseconds()
        }
        return Double(n) / (Double(now - start) / 1e9)
    }
}
