public import SharedMemory
public import Virtqueue

/// FNV-1a, 64-bit: the payload checksum both processes compute.
@inline(__always)
public func fnv1a(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0xcbf2_9ce4_8422_2325) -> UInt64 {
    var h = seed
    for b in bytes {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01b3
    }
    return h
}

/// The device of the harness: for each chain, reads the readable bytes, and writes into
/// the writable ones the same bytes XOR 0x5A followed by the FNV-1a checksum of what it
/// read (little-endian). The driver checks both, so a lost or corrupted byte shows.
///
/// Chains it cannot serve (malformed, or too short to hold the answer) complete with
/// length 0.
public struct EchoDevice {
    public static let checksumSize = 8
    /// Larger requests are not served: a hostile driver must not make the device allocate
    /// gigabytes of scratch (R5).
    public static let maximumRequest = 16 << 20
    var chain = DescriptorChain()
    var scratch: [UInt8] = []

    public init() {}

    /// Serves everything available on `queue`. Returns the number of chains completed,
    /// or throws when the driver broke the queue.
    public mutating func serve(_ queue: DeviceQueue, memory: GuestMemory, budget: Int = .max) throws(Violation) -> Int {
        var served = 0
        while served < budget {
            switch try queue.nextChain(into: &chain, memory: memory) {
            case .empty: return served
            case .rejected(let head, _):
                queue.complete(head: head, length: 0)
            case .ready:
                queue.complete(head: chain.head, length: answer())
            }
            served += 1
        }
        return served
    }

    /// Computes the answer for `chain`; returns bytes written.
    mutating func answer() -> UInt32 {
        let inLength = Int(chain.readableLength)
        guard inLength <= Self.maximumRequest, chain.writableLength >= UInt64(inLength + Self.checksumSize)
        else { return 0 }
        if scratch.count < inLength { scratch = [UInt8](repeating: 0, count: inLength) }
        // Copy the readable bytes once into private memory (R2), then work on the copy.
        scratch.withUnsafeMutableBytes { dst in
            guard let base = dst.baseAddress else { return }
            var o = 0
            for s in chain.readable {
                if let src = s.buffer.baseAddress, s.buffer.count > 0, o + s.buffer.count <= dst.count {
                    (base + o).copyMemory(from: src, byteCount: s.buffer.count)
                }
                o += s.buffer.count
            }
        }
        var checksum = scratch.withUnsafeBytes { fnv1a(UnsafeRawBufferPointer(rebasing: $0[..<inLength])) }
        var written = 0
        for s in chain.writable {
            guard let dst = s.buffer.baseAddress else { continue }
            var k = 0
            while k < s.buffer.count && written < inLength + Self.checksumSize {
                if written < inLength {
                    dst.storeBytes(of: scratch[written] ^ 0x5A, toByteOffset: k, as: UInt8.self)
                } else {
                    let byte = UInt8(truncatingIfNeeded: checksum)
                    checksum >>= 8
                    dst.storeBytes(of: byte, toByteOffset: k, as: UInt8.self)
                }
                k += 1
                written += 1
            }
        }
        return UInt32(written)
    }
}
