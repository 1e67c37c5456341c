/// The fuzzer's bytes, consumed front to back; runs out as zeros.
public struct FuzzInput {
    let bytes: UnsafeBufferPointer<UInt8>
    var offset = 0

    public init(_ data: UnsafePointer<UInt8>?, _ size: Int) {
        bytes = UnsafeBufferPointer(start: data, count: data == nil ? 0 : size)
    }

    public var isEmpty: Bool { offset >= bytes.count }
    public var remaining: Int { max(0, bytes.count - offset) }

    public mutating func byte() -> UInt8 {
        guard offset < bytes.count else { return 0 }
        defer { offset += 1 }
        return bytes[offset]
    }

    public mutating func integer<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(truncatingIfNeeded: byte()) << (8 * i) }
        return v
    }

    /// The next `count` bytes (fewer at the end of the input) in place, without a copy;
    /// valid while libFuzzer's input is, that is, for this run.
    public mutating func view(_ count: Int) -> UnsafeRawBufferPointer {
        let n = max(0, min(count, remaining))
        defer { offset += n }
        return UnsafeRawBufferPointer(start: bytes.baseAddress.map { $0 + offset }, count: n)
    }

    /// Copies up to `count` bytes into `destination`; returns how many.
    @discardableResult
    public mutating func copy(into destination: UnsafeMutableRawPointer, count: Int) -> Int {
        let n = max(0, min(count, remaining))
        if n > 0, let base = bytes.baseAddress {
            destination.copyMemory(from: base + offset, byteCount: n)
        }
        offset += n
        return n
    }
}

/// A fuzz-target assertion: aborts (which libFuzzer reports as a crash) with a message.
@inline(never)
public func fuzzCheck(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition {
        // Straight to fd 2: stdout is a file under scripts/fuzz, and abort() would drop its
        // buffer with the message in it.
        let line = "fuzz check failed: \(message())\n"
        _ = line.withCString { write(2, $0, strlen($0)) }
        abort()
    }
}

#if canImport(Glibc)
import Glibc
#endif
