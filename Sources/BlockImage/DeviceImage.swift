#if canImport(Glibc)
public import Glibc
#endif
internal import CRingFence
public import SharedMemory
import Synchronization

/// The file behind a block device, shared by both device sides (virtio-blk's
/// `VirtioBlockDevice` and Xen's blkif backend): positioned I/O only (no shared file
/// offset, so queue threads need no lock), EINTR retried, short transfers continued.
/// Callers check ranges against `size` before calling (R3); nothing here trusts a peer.
public final class DeviceImage: Sendable {
    /// Bytes per sector, for both virtio-blk and blkif.
    public static let sectorSize = 512

    public let path: String
    public let readOnly: Bool
    /// Bytes usable by the guest: the file size rounded down to whole sectors.
    public let size: UInt64
    let fd: Int32
    /// Opened with O_DIRECT when asked; buffers that O_DIRECT refuses (EINVAL: not
    /// aligned) fall back to `fd`, so a driver cannot make valid I/O fail by alignment.
    let directFD: Int32?
    /// Set after every modification returns, cleared by the `flush` that covers it: a
    /// flush (a FLUSH request, a front-end leaving) with nothing written since the last
    /// one skips fdatasync. Set after, never before, the write: a flush racing a write
    /// that has not returned leaves the flag for the next flush. Starts set: writes a
    /// previous server completed (a restart under a reconnecting driver) may still be
    /// only in the page cache.
    let dirty = Atomic<Bool>(true)
    public var isDirty: Bool { dirty.load(ordering: .acquiring) }

    public init(path: String, readOnly: Bool = false, direct: Bool = false) throws(SystemError) {
        let mode = readOnly ? O_RDONLY : O_RDWR
        let fd = open(path, mode | O_CLOEXEC)
        guard fd >= 0 else { throw .current("open(\(path))") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = SystemError.current("fstat(\(path))")
            closeDescriptor(fd)
            throw e
        }
        self.fd = fd
        self.path = path
        self.readOnly = readOnly
        self.size = UInt64(max(0, st.st_size)) / UInt64(Self.sectorSize) * UInt64(Self.sectorSize)
        if direct {
            let d = open(path, mode | O_CLOEXEC | RF_O_DIRECT)
            directFD = d >= 0 ? d : nil
        } else {
            directFD = nil
        }
    }

    deinit {
        closeDescriptor(fd)
        if let directFD { closeDescriptor(directFD) }
    }

    /// Writes all of `buffer` at `offset`.
    public func write(from buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard let base = buffer.baseAddress else { return true }
        defer { dirty.store(true, ordering: .releasing) }
        return positioned(UnsafeMutableRawPointer(mutating: base), count: buffer.count, at: offset, write: true)
    }

    /// Fills all of `buffer` from `offset`; bytes past the end of the file read as zeros.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard let base = buffer.baseAddress else { return true }
        return positioned(base, count: buffer.count, at: offset, write: false)
    }

    /// One pread/pwrite loop for both directions.
    private func positioned(_ base: UnsafeMutableRawPointer, count: Int, at offset: UInt64, write: Bool) -> Bool {
        var done = 0
        var useDirect = directFD != nil
        while done < count {
            let fd = useDirect ? directFD ?? self.fd : self.fd
            let position = off_t(offset) + off_t(done)
            let n =
                write ? pwrite(fd, base + done, count - done, position) : pread(fd, base + done, count - done, position)
            if n > 0 {
                done += n
            } else if n == 0 && !write {
                (base + done).initializeMemory(as: UInt8.self, repeating: 0, count: count - done)
                return true
            } else if n < 0 && errno == EINTR {
                continue
            } else if n < 0 && errno == EINVAL && useDirect {
                useDirect = false
            } else {
                return false
            }
        }
        return true
    }

    /// Largest vector count one preadv/pwritev takes (Linux IOV_MAX).
    public static let maximumVectors = 1024

    /// One vectored transfer of all of `vectors` at `offset` (a chain's data pieces in a
    /// few system calls instead of one per piece). Short transfers are continued; a read
    /// past the end of the file gives zeros. `vectors` is consumed (advanced in place).
    public func transfer(_ vectors: UnsafeMutableBufferPointer<iovec>, at offset: UInt64, write: Bool) -> Bool {
        guard let base = vectors.baseAddress else { return true }
        defer { if write { dirty.store(true, ordering: .releasing) } }
        var first = 0
        var position = off_t(offset)
        var useDirect = directFD != nil
        while true {
            while first < vectors.count && vectors[first].iov_len == 0 { first += 1 }
            guard first < vectors.count else { return true }
            let fd = useDirect ? directFD ?? self.fd : self.fd
            let count = Int32(min(vectors.count - first, Self.maximumVectors))
            let n = write ? pwritev(fd, base + first, count, position) : preadv(fd, base + first, count, position)
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EINVAL && useDirect {
                    useDirect = false
                    continue
                }
                return false
            }
            if n == 0 {
                guard !write else { return false }
                for i in first..<vectors.count {
                    vectors[i].iov_base?.initializeMemory(as: UInt8.self, repeating: 0, count: vectors[i].iov_len)
                }
                return true
            }
            position += off_t(n)
            var left = n
            while left > 0 && first < vectors.count {
                let length = vectors[first].iov_len
                if left >= length {
                    left -= length
                    first += 1
                } else {
                    vectors[first].iov_base = vectors[first].iov_base.map { $0 + left }
                    vectors[first].iov_len = length - left
                    left = 0
                }
            }
        }
    }

    /// fdatasync, skipped when nothing was modified since the last flush.
    public func flush() -> Bool {
        guard dirty.exchange(false, ordering: .acquiringAndReleasing) else { return true }
        while fdatasync(fd) != 0 {
            if errno != EINTR {
                dirty.store(true, ordering: .releasing)
                return false
            }
        }
        return true
    }

    /// Deallocates the range (reads return zeros afterwards).
    public func punchHole(at offset: UInt64, length: UInt64) -> Bool {
        fallocate(RF_FALLOC_FL_PUNCH_HOLE | RF_FALLOC_FL_KEEP_SIZE, offset, length)
    }

    /// Zeroes the range: ZERO_RANGE, else punch a hole (when unmapping is allowed), else
    /// write zeros — file systems differ in what they support.
    public func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) -> Bool {
        if fallocate(RF_FALLOC_FL_ZERO_RANGE | RF_FALLOC_FL_KEEP_SIZE, offset, length) { return true }
        if mayUnmap && punchHole(at: offset, length: length) { return true }
        let chunk = 1 << 16
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk), length - done))
            guard write(from: UnsafeRawBufferPointer(rebasing: zeros[..<n]), at: offset + done) else { return false }
            done += UInt64(n)
        }
        return true
    }

    /// Discards the range: punches a hole (the space is given back to the file system),
    /// else zero-fills it where the file system cannot punch, so reads of a discarded
    /// range return zeros either way.
    public func discard(at offset: UInt64, length: UInt64) -> Bool {
        punchHole(at: offset, length: length) || writeZeroes(at: offset, length: length, mayUnmap: false)
    }

    private func fallocate(_ mode: Int32, _ offset: UInt64, _ length: UInt64) -> Bool {
        defer { dirty.store(true, ordering: .releasing) }
        while rf_fallocate(fd, mode, Int64(offset), Int64(length)) != 0 {
            if errno != EINTR { return false }
        }
        return true
    }
}
