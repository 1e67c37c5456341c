/// A seedable generator for the property tests (SplitMix64): fast enough to fill rings
/// thousands of times, and reproducible from the seed PropertyBased reports.
public struct SplitMix: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    public mutating func fill(_ p: UnsafeMutableRawPointer, count: Int) {
        var i = 0
        while i < count {
            let v = next()
            for k in 0..<min(8, count - i) {
                p.storeBytes(of: UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))), toByteOffset: i + k, as: UInt8.self)
            }
            i += 8
        }
    }
}
