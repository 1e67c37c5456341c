import SharedMemory
import Virtqueue

/// Byte ranges of a chain's readable or writable part, which may be split anywhere across
/// descriptors (and regions): the one place the net handlers touch guest buffers.
enum ChainBytes {
    /// Copies `count` bytes from byte `offset` of `segments` once into private `into` (R2).
    /// The caller checked the range lies inside the segments.
    @inline(__always)
    static func gather(
        _ segments: ArraySlice<ChainSegment>, at offset: Int, count: Int, into: UnsafeMutableRawPointer
    ) {
        var skip = offset
        var remaining = count
        var done = 0
        for segment in segments where remaining > 0 {
            let length = segment.buffer.count
            if skip >= length {
                skip -= length
                continue
            }
            let n = min(length - skip, remaining)
            if let source = segment.buffer.baseAddress {
                SharedAccess.copy(from: source + skip, to: into + done, count: n)
            }
            skip = 0
            remaining -= n
            done += n
        }
    }

    /// Copies the first `count` readable bytes of `chain` once into private `into` (R2),
    /// straight from its segment table (no slice). The caller checked
    /// `count <= readableLength`.
    @inline(__always)
    static func gatherReadable(
        _ chain: UnsafeMutablePointer<DescriptorChain>, count: Int, into: UnsafeMutableRawPointer
    ) {
        // Elements read in place through the pointer: a closure over the array
        // (withUnsafeBufferPointer) costs a retain and a release per frame.
        let readable = chain.pointee.firstWritable
        var remaining = count
        var done = 0
        var i = 0
        while remaining > 0 && i < readable {
            let buffer = chain.pointee.segments[i].buffer
            let n = min(buffer.count, remaining)
            if let source = buffer.baseAddress { SharedAccess.copy(from: source, to: into + done, count: n) }
            remaining -= n
            done += n
            i += 1
        }
    }

    /// Writes `count` private bytes to byte `offset` of `segments` (write-only: nothing is
    /// read back). Returns the bytes written (less when the segments end first).
    @inline(__always)
    @discardableResult
    static func scatter(
        _ source: UnsafeRawPointer, count: Int, into segments: ArraySlice<ChainSegment>, at offset: Int
    ) -> Int {
        var skip = offset
        var remaining = count
        var done = 0
        for segment in segments where remaining > 0 {
            let length = segment.buffer.count
            if skip >= length {
                skip -= length
                continue
            }
            let n = min(length - skip, remaining)
            segment.buffer.baseAddress.map { ($0 + skip).copyMemory(from: source + done, byteCount: n) }
            skip = 0
            remaining -= n
            done += n
        }
        return done
    }
}
