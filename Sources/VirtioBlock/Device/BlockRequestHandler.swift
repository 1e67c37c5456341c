#if canImport(Glibc)
import Glibc
#endif
import BlockImage
public import SharedMemory
public import VhostUser
public import Virtqueue

/// Serves one virtio-blk queue (runs on that queue's thread only).
///
/// Request layout (virtio §5.2.6): device-readable `{le32 type; le32 ioprio; le64 sector}`
/// and data, then device-writable data and the status byte, which is the last writable
/// byte. Pieces may be split anywhere across descriptors (and regions), so everything is
/// addressed as byte offsets into the readable or writable part of the chain.
public final class BlockRequestHandler: QueueHandler {
    /// The device whose image this queue serves.
    public let device: VirtioBlockDevice
    /// The queue this handler serves.
    public let queueIndex: Int
    var chain = DescriptorChain()
    let identifier: [UInt8]
    /// Requests served, and how many ended with a status other than OK (for tests and logs).
    public private(set) var served = 0
    /// Requests answered with IOERR or UNSUPP.
    public private(set) var failed = 0
    /// Malformed chains seen (each completed with used length 0).
    public private(set) var rejected = 0
    /// Rejected chains are logged rate-limited (R6: a driver looping on garbage).
    var rejectionLog = LogThrottle()

    /// Reused for every request's data pieces.
    let vectors = UnsafeMutableBufferPointer<iovec>.allocate(capacity: DeviceImage.maximumVectors)

    deinit { vectors.deallocate() }

    init(device: VirtioBlockDevice, queue: Int) {
        self.device = device
        self.queueIndex = queue
        var id = Array(device.options.serial.utf8.prefix(BlockProtocol.idSize))
        id += [UInt8](repeating: 0, count: BlockProtocol.idSize - id.count)
        identifier = id
    }

    /// Pops at most `budget` chains, serves each and completes it (a malformed one with length 0); throws only when the ring itself is broken.
    public func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        var count = 0
        while count < budget {
            switch try queue.nextChain(into: &chain, memory: memory) {
            case .empty:
                return count
            case .rejected(let head, let violation):
                // The chain cannot be trusted to locate a status byte: used length 0 says
                // "nothing written", and the queue goes on (the request failed).
                // Logged rate-limited (the first 8, then at powers of two): a driver that
                // sends garbage in a loop must not flood the log (R6).
                rejected += 1
                device.counters.violation(violation.rule)
                if rejectionLog.admit() {
                    device.onEvent(.requestRejected(queue: queueIndex, violation))
                }
                queue.complete(head: head, length: 0)
                failed += 1
                device.counters.failed.add(1, ordering: .relaxed)
            case .ready:
                queue.complete(head: chain.head, length: process())
            }
            served += 1
            device.counters.requests.add(1, ordering: .relaxed)
            count += 1
        }
        return count
    }

    /// Executes a chain the caller popped itself and returns the used length, without
    /// completing it. Hook point: the Adversary decides when, how and whether to complete.
    public func execute(_ popped: DescriptorChain) -> UInt32 {
        chain = popped
        return process()
    }

    /// Executes the request in `chain`; returns the used length (bytes written).
    func process() -> UInt32 {
        let writable = chain.writableLength
        guard writable >= 1 else {
            failed += 1
            device.counters.failed.add(1, ordering: .relaxed)
            return 0  // no status byte to report anything in
        }
        guard chain.readableLength >= UInt64(BlockProtocol.requestHeaderSize) else {
            return finish(.ioError, written: 0)
        }
        // One copy of the header into private memory (R2); only the copy is looked at.
        var header: (UInt64, UInt64) = (0, 0)
        withUnsafeMutableBytes(of: &header) { gather(chain.readable, at: 0, into: $0) }
        let type = UInt32(truncatingIfNeeded: header.0)
        let sector = header.1
        let dataIn = writable - 1
        let dataOut = chain.readableLength - UInt64(BlockProtocol.requestHeaderSize)
        let image = device.image

        switch BlockProtocol.RequestType(rawValue: type) {
        case .read:
            guard let offset = byteRange(sector: sector, length: dataIn) else { return finish(.ioError, written: 0) }
            let ok = transfer(chain.writable, from: 0, count: dataIn, fileOffset: offset, write: false)
            if ok { device.counters.bytesRead.add(Int(truncatingIfNeeded: dataIn), ordering: .relaxed) }
            return ok ? finish(.ok, written: dataIn) : finish(.ioError, written: 0)
        case .write:
            guard !device.readOnly, let offset = byteRange(sector: sector, length: dataOut) else {
                return finish(.ioError, written: 0)
            }
            let ok = transfer(
                chain.readable, from: UInt64(BlockProtocol.requestHeaderSize), count: dataOut, fileOffset: offset,
                write: true)
            if ok { device.counters.bytesWritten.add(Int(truncatingIfNeeded: dataOut), ordering: .relaxed) }
            return finish(ok ? .ok : .ioError, written: 0)
        case .flush:
            return finish(image.flush() ? .ok : .ioError, written: 0)
        case .getID:
            let n = min(dataIn, UInt64(BlockProtocol.idSize))
            let id = identifier
            _ = forEachPiece(chain.writable, from: 0, count: n) { buffer, at in
                for i in 0..<buffer.count { buffer[i] = id[Int(at) + i] }
                return true
            }
            return finish(.ok, written: n)
        case .discard, .writeZeroes:
            return finish(
                discardOrZero(zero: type == BlockProtocol.RequestType.writeZeroes.rawValue, payload: dataOut),
                written: 0)
        case .none:
            return finish(.unsupported, written: 0)
        }
    }

    /// Moves the bytes `[start, start + count)` of `segments` to or from the image at
    /// `fileOffset`, in batches of up to IOV_MAX pieces (preallocated vector table: the
    /// hot path allocates nothing).
    func transfer(
        _ segments: ArraySlice<ChainSegment>, from start: UInt64, count: UInt64, fileOffset: UInt64, write: Bool
    ) -> Bool {
        let image = device.image
        let vectors = self.vectors
        var used = 0
        var batchStart: UInt64 = 0
        let collected = forEachPiece(segments, from: start, count: count) { buffer, at in
            if used == vectors.count {
                guard image.transfer(vectors, at: fileOffset + batchStart, write: write) else { return false }
                used = 0
                batchStart = at
            }
            vectors[used] = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
            used += 1
            return true
        }
        guard collected else { return false }
        return image.transfer(
            UnsafeMutableBufferPointer(rebasing: vectors[0..<used]), at: fileOffset + batchStart, write: write)
    }

    /// DISCARD / WRITE_ZEROES: a list of `{le64 sector; le32 num_sectors; le32 flags}`.
    /// Each range is copied once, checked, then carried out.
    func discardOrZero(zero: Bool, payload: UInt64) -> BlockProtocol.Status {
        guard !device.readOnly else { return .ioError }
        let size = UInt64(BlockProtocol.discardSegmentSize)
        let count = payload / size
        guard payload % size == 0, count >= 1, count <= UInt64(device.options.maximumDiscardSegments) else {
            return .ioError
        }
        for i in 0..<count {
            var range: (UInt64, UInt64) = (0, 0)
            withUnsafeMutableBytes(of: &range) {
                gather(chain.readable, at: UInt64(BlockProtocol.requestHeaderSize) + i * size, into: $0)
            }
            let sector = range.0
            let sectors = UInt32(truncatingIfNeeded: range.1)
            let flags = UInt32(truncatingIfNeeded: range.1 >> 32)
            // Discard has no flags; write-zeroes knows only UNMAP (bit 0).
            guard flags & (zero ? ~UInt32(1) : ~UInt32(0)) == 0 else { return .unsupported }
            guard sectors <= device.options.maximumDiscardSectors else { return .ioError }
            let length = UInt64(sectors) * UInt64(BlockProtocol.sectorSize)
            guard let offset = byteRange(sector: sector, length: length) else { return .ioError }
            if length == 0 { continue }
            let ok =
                zero
                ? device.image.writeZeroes(at: offset, length: length, mayUnmap: flags & 1 != 0)
                : device.image.punchHole(at: offset, length: length)
            guard ok else { return .ioError }
        }
        return .ok
    }

    /// The byte offset of `sector` when `[sector, sector + length/512)` lies inside the
    /// disk and `length` is whole sectors; nil otherwise. Overflow-safe for any input.
    func byteRange(sector: UInt64, length: UInt64) -> UInt64? {
        let sectorSize = UInt64(BlockProtocol.sectorSize)
        let capacity = device.capacitySectors
        guard length % sectorSize == 0, sector <= capacity, length / sectorSize <= capacity - sector else {
            return nil
        }
        return sector * sectorSize
    }

    /// Writes the status into the last writable byte; returns the used length.
    func finish(_ status: BlockProtocol.Status, written: UInt64) -> UInt32 {
        if status != .ok {
            failed += 1
            device.counters.failed.add(1, ordering: .relaxed)
        }
        let at = chain.writableLength - 1
        _ = forEachPiece(chain.writable, from: at, count: 1) { buffer, _ in
            buffer[0] = status.rawValue
            return true
        }
        // written + 1 <= writableLength <= UInt32.max (DeviceQueue bounds the chain).
        return UInt32(truncatingIfNeeded: written + 1)
    }

    /// Copies `into.count` bytes starting at byte `offset` of `segments` into private memory.
    func gather(_ segments: ArraySlice<ChainSegment>, at offset: UInt64, into: UnsafeMutableRawBufferPointer) {
        guard let destination = into.baseAddress else { return }
        _ = forEachPiece(segments, from: offset, count: UInt64(into.count)) { buffer, at in
            if let source = buffer.baseAddress {
                SharedAccess.copy(from: source, to: destination + Int(at), count: buffer.count)
            }
            return true
        }
    }

    /// Calls `body` with each piece of the bytes `[start, start + count)` of `segments`
    /// and the piece's offset from `start`. Stops at the first `false`. The caller has
    /// checked that the range lies inside the segments' total length.
    @inline(__always)
    func forEachPiece(
        _ segments: ArraySlice<ChainSegment>, from start: UInt64, count: UInt64,
        _ body: (UnsafeMutableRawBufferPointer, UInt64) -> Bool
    ) -> Bool {
        var skip = start
        var remaining = count
        var done: UInt64 = 0
        for segment in segments where remaining > 0 {
            let length = UInt64(segment.buffer.count)
            if skip >= length {
                skip -= length
                continue
            }
            let n = min(length - skip, remaining)
            let piece = UnsafeMutableRawBufferPointer(rebasing: segment.buffer[Int(skip)..<Int(skip + n)])
            guard body(piece, done) else { return false }
            skip = 0
            remaining -= n
            done += n
        }
        return true
    }
}
