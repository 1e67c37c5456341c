#if canImport(Glibc)
import Glibc
#endif
internal import CRingFence

/// A `MAP_SHARED` mapping of a memfd (or of a descriptor received from a peer).
///
/// Regions we create are sealed `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` (rule R7):
/// the peer cannot truncate the file under our mapping and SIGBUS us, and cannot undo
/// the seals. Regions we map from a peer must already carry `F_SEAL_SHRINK`.
public final class SharedRegion: @unchecked Sendable {
    // @unchecked Sendable: immutable mapping and descriptor; the bytes are shared memory by
    // design, accessed through `SharedAccess`/`GuestMemory`, never as Swift-owned state.
    /// Base of the mapping in this process. Never announced to a peer (R7).
    public let base: UnsafeMutableRawPointer
    public let size: Int
    private let mappingBase: UnsafeMutableRawPointer
    private let mappingLength: Int
    /// The memfd; owned by the region, closed on deinit.
    public let fileDescriptor: Int32

    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case system(SystemError)
        case invalidSize(Int)
        case notSealedAgainstShrinking(seals: Int32)
        case fileTooSmall(fileSize: Int64, needed: UInt64)
        case rangeOverflow(offset: UInt64, size: UInt64)

        public var description: String {
            switch self {
            case .system(let e): return e.description
            case .invalidSize(let n): return "invalid region size \(n)"
            case .notSealedAgainstShrinking(let s):
                return
                    "memory fd is not sealed against shrinking (seals 0x\(String(s, radix: 16))); a peer could truncate it and SIGBUS us"
            case .fileTooSmall(let have, let need):
                return "memory fd holds \(have) bytes but \(need) are needed"
            case .rangeOverflow(let o, let s): return "offset \(o) + size \(s) overflows"
            }
        }
    }

    /// Creates a zero-filled, sealed memfd of `size` bytes and maps it.
    public init(name: String, size: Int) throws(Error) {
        guard size > 0, size <= 1 << 40 else { throw .invalidSize(size) }
        let fd = rf_memfd_create(name, RF_MFD_CLOEXEC | RF_MFD_ALLOW_SEALING)
        guard fd >= 0 else { throw .system(.current("memfd_create")) }
        do {
            _ = try retrying("ftruncate") { ftruncate(fd, off_t(size)) }
            _ = try retrying("F_ADD_SEALS") {
                rf_add_seals(fd, RF_F_SEAL_SHRINK | RF_F_SEAL_GROW | RF_F_SEAL_SEAL)
            }
        } catch {
            closeDescriptor(fd)
            throw .system(error)
        }
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else {
            let e = SystemError.current("mmap")
            closeDescriptor(fd)
            throw .system(e)
        }
        self.base = p
        self.size = size
        self.mappingBase = p
        self.mappingLength = size
        self.fileDescriptor = fd
    }

    /// Maps `[offset, offset+size)` of a descriptor received from a peer, after checking
    /// that it is a memfd sealed against shrinking and large enough. The region owns the
    /// descriptor from here on; when the init throws, it has been closed (it was consumed,
    /// so the caller cannot close it a second time).
    public init(
        mapping descriptor: consuming OwnedDescriptor, offset: UInt64, size: UInt64, writable: Bool = true
    ) throws(Error) {
        let fd = descriptor.rawValue
        guard size > 0, size <= 1 << 40 else { throw .invalidSize(Int(clamping: size)) }
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard !overflow, end <= UInt64(Int64.max) else {
            throw .rangeOverflow(offset: offset, size: size)
        }
        let seals = rf_get_seals(fd)
        guard seals >= 0 else { throw .system(.current("F_GET_SEALS")) }
        guard seals & RF_F_SEAL_SHRINK != 0 else { throw .notSealedAgainstShrinking(seals: seals) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .system(.current("fstat")) }
        guard st.st_size >= 0, UInt64(st.st_size) >= end else {
            throw .fileTooSmall(fileSize: Int64(st.st_size), needed: end)
        }
        let prot = writable ? PROT_READ | PROT_WRITE : PROT_READ
        // mmap wants a page-aligned offset; peers (QEMU) may announce any offset.
        let page = UInt64(max(4096, sysconf(Int32(_SC_PAGESIZE))))
        let alignedOffset = offset & ~(page - 1)
        let slack = Int(offset - alignedOffset)
        let length = Int(size) + slack
        let p = mmap(nil, length, prot, MAP_SHARED, fd, off_t(alignedOffset))
        guard let p, p != MAP_FAILED else { throw .system(.current("mmap")) }
        self.mappingBase = p
        self.mappingLength = length
        self.base = p + slack
        self.size = Int(size)
        self.fileDescriptor = descriptor.take()
    }

    deinit {
        munmap(mappingBase, mappingLength)
        closeDescriptor(fileDescriptor)
    }

    public var bytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: size)
    }

    /// The seals currently on the descriptor.
    public var seals: Int32 { rf_get_seals(fileDescriptor) }

    public static var sealShrink: Int32 { RF_F_SEAL_SHRINK }
    public static var sealGrow: Int32 { RF_F_SEAL_GROW }
    public static var sealSeal: Int32 { RF_F_SEAL_SEAL }
}
