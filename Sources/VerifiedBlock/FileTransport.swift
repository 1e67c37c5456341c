#if canImport(Glibc)
import Glibc
#endif

/// A disk image file read and written with pread/pwrite: `ringfence seal` and local tests.
public final class FileTransport: BlockTransport {
    public let path: String
    let fd: Int32
    public let capacityBytes: UInt64

    public init(path: String, writable: Bool = false) throws(TransportError) {
        self.path = path
        fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw TransportError(rule: nil, "cannot open \(path): errno \(errno)") }
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0 else {
            close(fd)
            throw TransportError(rule: nil, "cannot size \(path): errno \(errno)")
        }
        capacityBytes = UInt64(end)
    }

    deinit { close(fd) }

    public func transfer(_ requests: [TransportRequest]) throws(TransportError) {
        for r in requests {
            var done = 0
            while done < r.buffer.count {
                let n: Int
                if r.write {
                    n = pwrite(
                        fd, r.buffer.baseAddress.map { $0 + done }, r.buffer.count - done, off_t(r.offset) + off_t(done)
                    )
                } else {
                    n = pread(
                        fd, r.buffer.baseAddress.map { $0 + done }, r.buffer.count - done, off_t(r.offset) + off_t(done)
                    )
                }
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else {
                    throw TransportError(
                        rule: nil, "\(path): \(r.write ? "write" : "read") at \(r.offset) failed (errno \(errno))")
                }
                done += n
            }
        }
    }

    public func flushWrites() throws(TransportError) {
        guard fsync(fd) == 0 else { throw TransportError(rule: nil, "\(path): fsync failed (errno \(errno))") }
    }
}
