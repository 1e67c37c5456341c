import CRingFence
import Glibc
import SharedMemory
import Testing

/// R7 and threat 1 (no SIGBUS): regions we create are sealed against shrinking, growing
/// and seal changes, so a device holding the memfd cannot truncate it under our mapping;
/// regions we map from a peer must already be sealed against shrinking, and large enough.
@Suite struct SharedRegionSealTests {
    static func errnoOf(_ body: () -> Int32) -> Int32 {
        errno = 0
        let r = body()
        return r == -1 ? errno : 0
    }

    static func inode(_ fd: Int32) -> (UInt64, UInt64)? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return (UInt64(st.st_dev), UInt64(st.st_ino))
    }

    @Test func createdRegionIsSealedAgainstShrinkGrowAndSeal() throws {
        let region = try SharedRegion(name: "seal", size: 3 * 4096)
        let wanted = SharedRegion.sealShrink | SharedRegion.sealGrow | SharedRegion.sealSeal
        #expect(region.seals & wanted == wanted)
        #expect(region.seals & RF_F_SEAL_WRITE == 0)  // the driver writes into it
        var st = stat()
        #expect(fstat(region.fileDescriptor, &st) == 0 && st.st_size == 3 * 4096)
        #expect(fcntl(region.fileDescriptor, F_GETFD) & FD_CLOEXEC != 0)
    }

    /// Every way a device could change the file's size or seals, through the descriptor
    /// it received (and through a fresh open of it), fails with EPERM.
    static func expectCannotResizeOrUnseal(_ fd: Int32, size: Int) {
        #expect(errnoOf { ftruncate(fd, 0) } == EPERM)
        #expect(errnoOf { ftruncate(fd, off_t(size / 2)) } == EPERM)
        #expect(errnoOf { ftruncate(fd, off_t(size * 2)) } == EPERM)
        #expect(posix_fallocate(fd, off_t(size), 4096) == EPERM)
        #expect(errnoOf { rf_add_seals(fd, RF_F_SEAL_WRITE) } == EPERM)
        #expect(errnoOf { rf_add_seals(fd, 0) } == EPERM)
    }

    @Test func deviceCannotTruncateTheRegionToSIGBUSTheDriver() throws {
        let size = 4 * 4096
        let region = try SharedRegion(name: "sigbus", size: size)
        region.base.storeBytes(of: 0xAB, toByteOffset: size - 1, as: UInt8.self)
        // Through our own descriptor...
        Self.expectCannotResizeOrUnseal(region.fileDescriptor, size: size)
        // ...through a copy passed to the "device" over a socket...
        let (a, b) = try UnixChannel.pair()
        try a.send([1], descriptors: [region.fileDescriptor])
        var byte: UInt8 = 0
        let fds = try withUnsafeMutableBytes(of: &byte) {
            try b.receive(exactly: $0, maxDescriptors: 1, until: .after(seconds: 5))
        }
        #expect(fds.count == 1)
        for fd in fds {
            Self.expectCannotResizeOrUnseal(fd, size: size)
            // ...and through a new open file description of the same memfd.
            let reopened = open("/proc/self/fd/\(fd)", O_RDWR | O_CLOEXEC)
            #expect(reopened >= 0)
            if reopened >= 0 {
                Self.expectCannotResizeOrUnseal(reopened, size: size)
                close(reopened)
            }
            close(fd)
        }
        var st = stat()
        #expect(fstat(region.fileDescriptor, &st) == 0 && st.st_size == off_t(size))
        // Touching the last page would SIGBUS (and kill this test run) had any truncation worked.
        #expect(region.base.load(fromByteOffset: size - 1, as: UInt8.self) == 0xAB)
    }

    // MARK: mapping a descriptor from a peer

    @Test func mappingRefusesMemfdWithoutSealingSupport() throws {
        // Without MFD_ALLOW_SEALING the kernel sets F_SEAL_SEAL and nothing else.
        let fd = rf_memfd_create("unsealed", RF_MFD_CLOEXEC)
        #expect(fd >= 0)
        #expect(ftruncate(fd, 8192) == 0)
        let id = Self.inode(fd)
        #expect(throws: SharedRegion.Error.notSealedAgainstShrinking(seals: RF_F_SEAL_SEAL)) {
            try SharedRegion(mapping: OwnedDescriptor(fd), offset: 0, size: 4096)
        }
        // Ownership: the refused descriptor was closed (or its number reused by someone else).
        if let now = Self.inode(fd), let id { #expect(now != id) }
    }

    @Test(arguments: [Int32(0), RF_F_SEAL_GROW, RF_F_SEAL_GROW | RF_F_SEAL_SEAL, RF_F_SEAL_WRITE])
    func mappingRefusesMemfdNotSealedAgainstShrinking(seals: Int32) throws {
        let fd = rf_memfd_create("partly-sealed", RF_MFD_CLOEXEC | RF_MFD_ALLOW_SEALING)
        #expect(fd >= 0)
        #expect(ftruncate(fd, 8192) == 0)
        if seals != 0 { #expect(rf_add_seals(fd, seals) == 0) }
        #expect(throws: SharedRegion.Error.notSealedAgainstShrinking(seals: seals)) {
            try SharedRegion(mapping: OwnedDescriptor(fd), offset: 0, size: 4096)
        }
    }

    @Test func mappingRefusesDescriptorThatCannotBeSealed() throws {
        var p: [Int32] = [-1, -1]
        #expect(pipe(&p) == 0)
        defer { close(p[1]) }
        #expect(throws: SharedRegion.Error.system(SystemError("F_GET_SEALS", errno: .invalidArgument))) {
            try SharedRegion(mapping: OwnedDescriptor(p[0]), offset: 0, size: 4096)
        }
    }

    static func sealedCopy(pages: Int) throws -> (SharedRegion, Int32) {
        let region = try SharedRegion(name: "peer", size: pages * 4096)
        let fd = fcntl(region.fileDescriptor, F_DUPFD_CLOEXEC, 0)
        #expect(fd >= 0)
        return (region, fd)
    }

    @Test(
        arguments: [(0, 8192, 8192), (4096, 1, 4097), (1, 4096, 4097), (0, 1 << 40, 1 << 40)]
            as [(UInt64, UInt64, UInt64)])
    func mappingRefusesFileTooSmall(offset: UInt64, size: UInt64, needed: UInt64) throws {
        let (region, fd) = try Self.sealedCopy(pages: 1)
        #expect(throws: SharedRegion.Error.fileTooSmall(fileSize: 4096, needed: needed)) {
            try SharedRegion(mapping: OwnedDescriptor(fd), offset: offset, size: size)
        }
        withExtendedLifetime(region) {}
    }

    @Test(arguments: [(.max, 1), (UInt64(Int64.max), 1), (1 << 63, 4096)] as [(UInt64, UInt64)])
    func mappingRefusesRangeOverflow(offset: UInt64, size: UInt64) throws {
        let (region, fd) = try Self.sealedCopy(pages: 1)
        #expect(throws: SharedRegion.Error.rangeOverflow(offset: offset, size: size)) {
            try SharedRegion(mapping: OwnedDescriptor(fd), offset: offset, size: size)
        }
        withExtendedLifetime(region) {}
    }

    @Test(arguments: [UInt64(0), (1 << 40) + 1, .max])
    func mappingRefusesAbsurdSize(size: UInt64) throws {
        let (region, fd) = try Self.sealedCopy(pages: 1)
        #expect(throws: SharedRegion.Error.invalidSize(Int(clamping: size))) {
            try SharedRegion(mapping: OwnedDescriptor(fd), offset: 0, size: size)
        }
        withExtendedLifetime(region) {}
    }

    @Test func mappingAtUnalignedOffsetSeesTheSameBytes() throws {
        let (region, fd) = try Self.sealedCopy(pages: 3)
        let peer = try SharedRegion(mapping: OwnedDescriptor(fd), offset: 4096 + 100, size: 4096)
        #expect(peer.size == 4096)
        for i in stride(from: 0, to: 4096, by: 511) {
            region.base.storeBytes(of: UInt8(truncatingIfNeeded: i * 7 + 1), toByteOffset: 4196 + i, as: UInt8.self)
            #expect(peer.base.load(fromByteOffset: i, as: UInt8.self) == UInt8(truncatingIfNeeded: i * 7 + 1))
        }
        peer.base.storeBytes(of: 0x5A, toByteOffset: 4095, as: UInt8.self)
        #expect(region.base.load(fromByteOffset: 4196 + 4095, as: UInt8.self) == 0x5A)
        // Exactly to the end of the file is fine.
        let (r2, fd2) = try Self.sealedCopy(pages: 2)
        let tail = try SharedRegion(mapping: OwnedDescriptor(fd2), offset: 4097, size: 8192 - 4097)
        #expect(tail.size == 8192 - 4097)
        withExtendedLifetime(r2) {}
    }
}
