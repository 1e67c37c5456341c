/// A slice of the bounce pool: the only place request data and headers are shared.
public struct BounceSlice: Sendable, Equatable {
    /// Offset from the start of the pool.
    public let offset: Int
    /// Bytes requested.
    public let length: Int
    @usableFromInline let granules: Int

    @usableFromInline
    init(offset: Int, length: Int, granules: Int) {
        self.offset = offset
        self.length = length
        self.granules = granules
    }
}

/// swiotlb-like bounce buffers inside the sealed shared region (rule R7).
///
/// The driver copies data in before posting and copies out only the validated length
/// after completion; private buffers are never shared. Freed slices are zeroed, so a
/// fresh allocation holds nothing from an earlier request. A granule is 64 bytes (a cache
/// line, so two requests never share a line). A caller may instead park a finished
/// request's slice and `reuse` it (what `BlockQueue` does on its hot path); it then zeroes
/// the private data it copied in (`zero`) when the request ends, so what stays in shared
/// memory is only what the device itself wrote, or request metadata it was given anyway.
///
/// Not thread-safe: one pool per queue.
public final class BouncePool {
    /// Allocation unit in bytes (one cache line).
    public static let granule = 64

    /// Local address of the pool.
    public let base: UnsafeMutableRawPointer
    /// The address the device knows the pool by (synthetic, R7).
    public let guestAddress: UInt64
    /// Bytes of the pool.
    public let size: Int
    let granuleCount: Int
    var bitmap: [UInt64]
    var hint = 0
    /// Bytes currently allocated.
    public private(set) var bytesInUse = 0

    /// `base` must be zeroed memory of `size` bytes inside the shared region that the
    /// device sees at `guestAddress`.
    public init(base: UnsafeMutableRawPointer, guestAddress: UInt64, size: Int) {
        self.base = base
        self.guestAddress = guestAddress
        self.granuleCount = size / Self.granule
        self.size = granuleCount * Self.granule
        bitmap = Array(repeating: 0, count: (granuleCount + 63) / 64)
        // Granules past the end are permanently "used".
        let tail = granuleCount % 64
        if tail != 0 { bitmap[bitmap.count - 1] = ~((UInt64(1) << UInt64(tail)) - 1) }
    }

    /// Allocates `length` bytes (>= 1), or nil if the pool has no run that large.
    public func allocate(_ length: Int) -> BounceSlice? {
        guard length > 0, length <= size else { return nil }
        let n = (length + Self.granule - 1) / Self.granule
        let start = findRun(n, from: hint, to: granuleCount) ?? findRun(n, from: 0, to: hint)
        guard let start else { return nil }
        setBits(start, n, used: true)
        hint = start + n == granuleCount ? 0 : start + n
        bytesInUse += n * Self.granule
        return BounceSlice(offset: start * Self.granule, length: length, granules: n)
    }

    /// Zeroes and frees a slice.
    public func free(_ slice: BounceSlice) {
        let bytes = slice.granules * Self.granule
        (base + slice.offset).initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        setBits(slice.offset / Self.granule, slice.granules, used: false)
        bytesInUse -= bytes
    }

    /// Granules a slice of `length` bytes occupies.
    @inlinable @inline(__always)
    public static func granules(for length: Int) -> Int { (length + granule - 1) / granule }

    /// `slice` again, for a new request of `length` bytes that fits the same granules
    /// (nil otherwise). For a caller that parks a finished request's slice to reuse it
    /// (LIFO, cache-hot) instead of freeing it: the caller must have zeroed any private
    /// data it copied in (`zero`), so what a reused slice still holds is only what the
    /// device itself wrote or request metadata the device was given anyway.
    @inlinable @inline(__always)
    public func reuse(_ slice: BounceSlice, length: Int) -> BounceSlice? {
        guard length > 0, Self.granules(for: length) == slice.granules else { return nil }
        return BounceSlice(offset: slice.offset, length: length, granules: slice.granules)
    }

    /// Zeroes `count` bytes of the slice from `offset` (clamped to the slice's granules):
    /// private data copied in for a request that has ended.
    @inlinable @inline(__always)
    public func zero(_ slice: BounceSlice, at offset: Int, count: Int) {
        let limit = slice.granules * Self.granule
        guard offset >= 0, offset < limit, count > 0 else { return }
        (base + slice.offset + offset).initializeMemory(as: UInt8.self, repeating: 0, count: min(count, limit - offset))
    }

    /// The address the device uses for `slice` (+ `offset` bytes).
    @inlinable @inline(__always)
    public func guestAddress(of slice: BounceSlice, offset: Int = 0) -> UInt64 {
        guestAddress &+ UInt64(slice.offset + offset)
    }

    /// A segment for the device covering `slice` (or a part of it).
    @inlinable @inline(__always)
    public func segment(_ slice: BounceSlice, offset: Int = 0, length: Int? = nil, deviceWritable: Bool) -> Segment {
        let len = min(length ?? (slice.length - offset), slice.length - offset)
        return Segment(
            address: guestAddress(of: slice, offset: offset), length: UInt32(clamping: len),
            deviceWritable: deviceWritable)
    }

    /// Copies private bytes into the slice at `offset` (clamped to the slice).
    @inlinable @inline(__always)
    public func copyIn(_ slice: BounceSlice, at offset: Int = 0, from source: UnsafeRawBufferPointer) {
        guard offset >= 0, offset < slice.length, let src = source.baseAddress else { return }
        let count = min(source.count, slice.length - offset)
        (base + slice.offset + offset).copyMemory(from: src, byteCount: count)
    }

    /// Stores a little-endian integer into the slice (request headers). Write-only (R1).
    @inlinable @inline(__always)
    public func store<T: FixedWidthInteger>(_ value: T, in slice: BounceSlice, at offset: Int) {
        guard offset >= 0, offset + MemoryLayout<T>.size <= slice.length else { return }
        (base + slice.offset + offset).storeBytes(of: value.littleEndian, as: T.self)
    }

    /// Copies out at most `validatedLength` bytes from `offset` (clamped to the slice and
    /// to the destination). Returns the count copied. One copy: the bytes are fetched once.
    @inlinable @inline(__always)
    @discardableResult
    public func copyOut(
        _ slice: BounceSlice, at offset: Int = 0, validatedLength: Int, to destination: UnsafeMutableRawBufferPointer
    ) -> Int {
        guard offset >= 0, offset < slice.length, let dst = destination.baseAddress else { return 0 }
        let count = max(0, min(validatedLength, slice.length - offset, destination.count))
        dst.copyMemory(from: base + slice.offset + offset, byteCount: count)
        return count
    }

    /// Loads one byte the device wrote (a status byte), once.
    @inlinable @inline(__always)
    public func loadByte(_ slice: BounceSlice, at offset: Int) -> UInt8? {
        guard offset >= 0, offset < slice.length else { return nil }
        return (base + slice.offset + offset).load(as: UInt8.self)
    }

    // MARK: bitmap

    /// First run of `n` free granules starting in `[from, to)`.
    func findRun(_ n: Int, from: Int, to: Int) -> Int? {
        var i = from
        while i < to && i + n <= granuleCount {
            // Skip used granules.
            let usedRun = (~(bitmap[i >> 6] >> UInt64(i & 63))).trailingZeroBitCount
            if usedRun > 0 {
                i += min(usedRun, 64 - (i & 63))
                continue
            }
            // Measure the free run at i.
            var length = 0
            var j = i
            while length < n && j < granuleCount {
                let bits = bitmap[j >> 6] >> UInt64(j & 63)
                let room = 64 - (j & 63)
                let free = bits == 0 ? room : min(bits.trailingZeroBitCount, room)
                length += free
                j += free
                if free < room { break }
            }
            if length >= n { return i }
            i = j
        }
        return nil
    }

    func setBits(_ start: Int, _ n: Int, used: Bool) {
        var i = start
        let end = start + n
        while i < end {
            let bit = i & 63
            let count = min(64 - bit, end - i)
            let mask = count == 64 ? ~UInt64(0) : ((UInt64(1) << UInt64(count)) - 1) << UInt64(bit)
            if used { bitmap[i >> 6] |= mask } else { bitmap[i >> 6] &= ~mask }
            i += count
        }
    }
}
