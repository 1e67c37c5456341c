/// Little-endian fields of the on-disk records (explicit offsets, no pointer casts).
extension Array where Element == UInt8 {
    mutating func putLE(_ value: UInt64, at offset: Int) {
        for k in 0..<8 { self[offset + k] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(k))) }
    }

    mutating func putLE32(_ value: UInt32, at offset: Int) {
        for k in 0..<4 { self[offset + k] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(k))) }
    }

    func le64(at offset: Int) -> UInt64 {
        var v: UInt64 = 0
        for k in 0..<8 { v |= UInt64(self[offset + k]) << (8 * UInt64(k)) }
        return v
    }

    func le32(at offset: Int) -> UInt32 {
        var v: UInt32 = 0
        for k in 0..<4 { v |= UInt32(self[offset + k]) << (8 * UInt32(k)) }
        return v
    }

    mutating func put(_ bytes: [UInt8], at offset: Int) {
        for k in 0..<bytes.count { self[offset + k] = bytes[k] }
    }

    func slice(_ offset: Int, _ count: Int) -> [UInt8] { Array(self[offset..<offset + count]) }
}

/// Lower-case hex, for root hashes and device identities.
public func hexString(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef")
    var s = ""
    for b in bytes {
        s.append(digits[Int(b >> 4)])
        s.append(digits[Int(b & 15)])
    }
    return s
}

/// Parses hex (even length, any case); nil for anything else.
public func parseHex(_ text: String) -> [UInt8]? {
    let chars = Array(text.utf8)
    guard chars.count % 2 == 0 else { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(chars.count / 2)
    func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: return c - 48
        case 97...102: return c - 87
        case 65...70: return c - 55
        default: return nil
        }
    }
    var i = 0
    while i < chars.count {
        guard let hi = nibble(chars[i]), let lo = nibble(chars[i + 1]) else { return nil }
        out.append(hi << 4 | lo)
        i += 2
    }
    return out
}
