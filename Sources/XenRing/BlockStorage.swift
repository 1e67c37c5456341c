#if canImport(Glibc)
import Glibc
#endif

/// What a blkif backend serves: 512-byte sectors. Implementations are private to the
/// backend process; the backend checks ranges before calling them (R3).
public protocol BlockStorage: AnyObject {
    var sectorCount: UInt64 { get }
    func read(sector: UInt64, into buffer: UnsafeMutableRawPointer, bytes: Int) -> Bool
    func write(sector: UInt64, from buffer: UnsafeRawPointer, bytes: Int) -> Bool
    func flush() -> Bool
    func discard(sector: UInt64, sectors: UInt64) -> Bool
}

/// An in-memory disk (tests, benchmarks).
public final class MemoryStorage: BlockStorage {
    public let sectorCount: UInt64
    let bytes: UnsafeMutableRawPointer

    public init(sectors: Int) {
        sectorCount = UInt64(max(0, sectors))
        bytes = UnsafeMutableRawPointer.allocate(byteCount: max(1, sectors * 512), alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: 0, count: max(1, sectors * 512))
    }

    deinit { bytes.deallocate() }

    public func read(sector: UInt64, into buffer: UnsafeMutableRawPointer, bytes n: Int) -> Bool {
        buffer.copyMemory(from: bytes + Int(sector) * 512, byteCount: n)
        return true
    }

    public func write(sector: UInt64, from buffer: UnsafeRawPointer, bytes n: Int) -> Bool {
        (bytes + Int(sector) * 512).copyMemory(from: buffer, byteCount: n)
        return true
    }

    public func flush() -> Bool { true }

    public func discard(sector: UInt64, sectors: UInt64) -> Bool {
        guard sectors <= 32768 else { return false }
        (bytes + Int(sector) * 512).initializeMemory(as: UInt8.self, repeating: 0, count: Int(sectors) * 512)
        return true
    }

    /// Direct access for tests.
    public func withBytes<R>(_ body: (UnsafeMutableRawBufferPointer) -> R) -> R {
        body(UnsafeMutableRawBufferPointer(start: bytes, count: Int(sectorCount) * 512))
    }
}

/// A disk image file: pread/pwrite/fdatasync; discard punches a hole.
public final class FileStorage: BlockStorage {
    public let sectorCount: UInt64
    public let fileDescriptor: Int32

    public enum Error: Swift.Error, CustomStringConvertible {
        case open(String, Int32)
        case tooSmall(String)
        public var description: String {
            switch self {
            case .open(let p, let e): return "cannot open \(p): errno \(e)"
            case .tooSmall(let p): return "\(p) is smaller than one 512-byte sector"
            }
        }
    }

    public init(path: String, readOnly: Bool = false) throws(Error) {
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw .open(path, errno) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size >= 512 else {
            close(fd)
            throw .tooSmall(path)
        }
        fileDescriptor = fd
        sectorCount = UInt64(st.st_size) / 512
    }

    deinit { close(fileDescriptor) }

    public func read(sector: UInt64, into buffer: UnsafeMutableRawPointer, bytes: Int) -> Bool {
        var done = 0
        while done < bytes {
            let n = pread(fileDescriptor, buffer + done, bytes - done, off_t(sector * 512) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            done += n
        }
        return true
    }

    public func write(sector: UInt64, from buffer: UnsafeRawPointer, bytes: Int) -> Bool {
        var done = 0
        while done < bytes {
            let n = pwrite(fileDescriptor, buffer + done, bytes - done, off_t(sector * 512) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            done += n
        }
        return true
    }

    public func flush() -> Bool { fdatasync(fileDescriptor) == 0 }

    /// Zero-fills; at most 16 MiB per request so one request cannot stall the backend
    /// for long (R5); larger ones are refused (answered EOPNOTSUPP).
    public func discard(sector: UInt64, sectors: UInt64) -> Bool {
        guard sectors <= 32768 else { return false }
        let chunk = 65536
        let zeros = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0, count: chunk)
        var s = sector
        var left = Int(sectors) * 512
        while left > 0 {
            let n = min(left, chunk)
            guard write(sector: s, from: zeros, bytes: n) else { return false }
            s += UInt64(n / 512)
            left -= n
        }
        return true
    }
}
