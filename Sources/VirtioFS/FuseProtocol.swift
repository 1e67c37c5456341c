/// FUSE wire format as virtio-fs carries it (Linux `include/uapi/linux/fuse.h`, protocol
/// 7.x). Shared by the driver and the device. Every structure is written and read at
/// explicit little-endian offsets; nothing is ever cast onto foreign bytes.
public enum FuseProtocol {
    public static let majorVersion: UInt32 = 7
    /// The minor version we speak (Linux 6.1 speaks 37; virtiofsd of QEMU 7.2 answers 7.36 or lower).
    public static let minorVersion: UInt32 = 36
    /// Oldest minor whose reply layouts we parse (64-byte INIT reply, 128-byte entries).
    public static let minimumMinorVersion: UInt32 = 23

    public static let inHeaderSize = 40
    public static let outHeaderSize = 16
    public static let attrSize = 88
    public static let entryOutSize = 128
    public static let attrOutSize = 104
    public static let openOutSize = 16
    public static let writeOutSize = 8
    public static let statfsOutSize = 80
    public static let initInSize = 64
    public static let initOutSize = 64
    /// `struct fuse_dirent` up to its name.
    public static let direntHeaderSize = 24
    /// `struct fuse_direntplus` up to its name (entry_out + dirent).
    public static let direntplusHeaderSize = entryOutSize + direntHeaderSize
    /// The longest name a directory entry or a path component may carry (NAME_MAX).
    public static let maximumNameLength = 255
    /// The longest symlink target we send or accept (PATH_MAX without the NUL).
    public static let maximumLinkLength = 4095
    /// Errors are negated errno values in (-4096, 0].
    public static let errorLimit: Int32 = -4096

    public enum Opcode: UInt32, Sendable, CaseIterable {
        case lookup = 1
        case forget = 2
        case getattr = 3
        case setattr = 4
        case readlink = 5
        case symlink = 6
        case mknod = 8
        case mkdir = 9
        case unlink = 10
        case rmdir = 11
        case rename = 12
        case link = 13
        case open = 14
        case read = 15
        case write = 16
        case statfs = 17
        case release = 18
        case fsync = 20
        case setxattr = 21
        case getxattr = 22
        case listxattr = 23
        case removexattr = 24
        case flush = 25
        case initialize = 26
        case opendir = 27
        case readdir = 28
        case releasedir = 29
        case fsyncdir = 30
        case getlk = 31
        case setlk = 32
        case setlkw = 33
        case access = 34
        case create = 35
        case interrupt = 36
        case bmap = 37
        case destroy = 38
        case ioctl = 39
        case poll = 40
        case notifyReply = 41
        case batchForget = 42
        case fallocate = 43
        case readdirplus = 44
        case rename2 = 45
        case lseek = 46
        case copyFileRange = 47
        case setupMapping = 48
        case removeMapping = 49
        case syncfs = 50
    }

    /// INIT flags we use.
    public enum InitFlag {
        public static let asyncRead: UInt32 = 1 << 0
        public static let atomicOTrunc: UInt32 = 1 << 3
        public static let bigWrites: UInt32 = 1 << 5
        public static let doReaddirplus: UInt32 = 1 << 13
        public static let parallelDirops: UInt32 = 1 << 18
        public static let maxPages: UInt32 = 1 << 22
    }

    /// SETATTR `valid` bits.
    public enum SetattrValid {
        public static let mode: UInt32 = 1 << 0
        public static let uid: UInt32 = 1 << 1
        public static let gid: UInt32 = 1 << 2
        public static let size: UInt32 = 1 << 3
        public static let atime: UInt32 = 1 << 4
        public static let mtime: UInt32 = 1 << 5
        public static let fh: UInt32 = 1 << 6
        public static let atimeNow: UInt32 = 1 << 7
        public static let mtimeNow: UInt32 = 1 << 8
        public static let lockOwner: UInt32 = 1 << 9
        public static let ctime: UInt32 = 1 << 10
        public static let killSuidgid: UInt32 = 1 << 11
    }

    /// RENAME2 flags (renameat2).
    public enum RenameFlag {
        public static let noReplace: UInt32 = 1 << 0
        public static let exchange: UInt32 = 1 << 1
    }

    /// The nodeid of the root directory; 0 is never an inode ("not found").
    public static let rootNodeID: UInt64 = 1

    /// S_IFMT and the types a FUSE attribute may carry.
    public enum FileType: UInt32, Sendable, CaseIterable {
        case fifo = 0o010000
        case characterDevice = 0o020000
        case directory = 0o040000
        case blockDevice = 0o060000
        case regular = 0o100000
        case symlink = 0o120000
        case socket = 0o140000

        public static let mask: UInt32 = 0o170000

        /// The type of a mode, or nil for a type bit pattern that is none of these.
        public init?(mode: UInt32) { self.init(rawValue: mode & Self.mask) }

        /// The directory-entry type (DT_*) of this file type.
        public var direntType: UInt32 { rawValue >> 12 }
    }
}

/// Little-endian writer of a private request or reply.
public struct FuseWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func put<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Empties the writer and keeps its storage (a reply buffer reused per request).
    public mutating func removeAll() { bytes.removeAll(keepingCapacity: true) }

    public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: max(0, n))) }

    public mutating func append(_ b: some Sequence<UInt8>) { bytes.append(contentsOf: b) }

    /// A name or path component followed by its NUL terminator.
    public mutating func string(_ s: String) {
        bytes.append(contentsOf: s.utf8)
        bytes.append(0)
    }

    /// Pads with zeros to a multiple of 8 (directory entries).
    public mutating func align8() { zeros((8 - bytes.count % 8) % 8) }

    public var count: Int { bytes.count }
}

/// Bounded little-endian reader over a private copy of foreign bytes: every read is
/// checked against what remains and returns nil instead of trapping (R4).
public struct FuseReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        self.offset = max(0, min(offset, bytes.count))
    }

    public var remaining: Int { bytes.count - offset }

    public mutating func get<T: FixedWidthInteger>(_: T.Type = T.self) -> T? {
        let n = MemoryLayout<T>.size
        guard remaining >= n else { return nil }
        var v: T = 0
        for i in 0..<n { v |= T(truncatingIfNeeded: bytes[offset + i]) << (8 * i) }
        offset += n
        return v
    }

    public mutating func skip(_ n: Int) -> Bool {
        guard n >= 0, remaining >= n else { return false }
        offset += n
        return true
    }

    public mutating func take(_ n: Int) -> ArraySlice<UInt8>? {
        guard n >= 0, remaining >= n else { return nil }
        defer { offset += n }
        return bytes[offset..<offset + n]
    }

    /// A NUL-terminated string of at most `limit` bytes (without the NUL), or nil.
    public mutating func cString(limit: Int) -> [UInt8]? {
        let end = min(bytes.count, offset + limit + 1)
        guard let nul = bytes[offset..<end].firstIndex(of: 0) else { return nil }
        let s = Array(bytes[offset..<nul])
        offset = nul + 1
        return s
    }
}

/// `struct fuse_in_header` (40 bytes).
public struct FuseInHeader: Sendable, Equatable {
    public var length: UInt32
    public var opcode: UInt32
    public var unique: UInt64
    public var nodeID: UInt64
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var pid: UInt32 = 0

    public init(length: UInt32, opcode: UInt32, unique: UInt64, nodeID: UInt64, uid: UInt32 = 0, gid: UInt32 = 0) {
        self.length = length
        self.opcode = opcode
        self.unique = unique
        self.nodeID = nodeID
        self.uid = uid
        self.gid = gid
    }

    public func encode(into w: inout FuseWriter) {
        w.put(length)
        w.put(opcode)
        w.put(unique)
        w.put(nodeID)
        w.put(uid)
        w.put(gid)
        w.put(pid)
        w.put(UInt32(0))  // total_extlen, padding
    }

    public static func decode(_ r: inout FuseReader) -> FuseInHeader? {
        guard let length = r.get(UInt32.self), let opcode = r.get(UInt32.self), let unique = r.get(UInt64.self),
            let nodeID = r.get(UInt64.self), let uid = r.get(UInt32.self), let gid = r.get(UInt32.self),
            let pid = r.get(UInt32.self), r.skip(4)
        else { return nil }
        var h = FuseInHeader(length: length, opcode: opcode, unique: unique, nodeID: nodeID, uid: uid, gid: gid)
        h.pid = pid
        return h
    }
}

/// `struct fuse_out_header` (16 bytes).
public struct FuseOutHeader: Sendable, Equatable {
    public var length: UInt32
    public var error: Int32
    public var unique: UInt64

    public init(length: UInt32, error: Int32, unique: UInt64) {
        self.length = length
        self.error = error
        self.unique = unique
    }

    public func encode(into w: inout FuseWriter) {
        w.put(length)
        w.put(error)
        w.put(unique)
    }

    public static func decode(_ r: inout FuseReader) -> FuseOutHeader? {
        guard let length = r.get(UInt32.self), let error = r.get(Int32.self), let unique = r.get(UInt64.self) else {
            return nil
        }
        return FuseOutHeader(length: length, error: error, unique: unique)
    }
}

/// `struct fuse_attr` (88 bytes), as the device sent it (raw: the driver validates it
/// into `FileAttributes`).
public struct FuseAttr: Sendable, Equatable {
    public var ino: UInt64 = 0
    public var size: UInt64 = 0
    public var blocks: UInt64 = 0
    public var atime: UInt64 = 0
    public var mtime: UInt64 = 0
    public var ctime: UInt64 = 0
    public var atimeNanoseconds: UInt32 = 0
    public var mtimeNanoseconds: UInt32 = 0
    public var ctimeNanoseconds: UInt32 = 0
    public var mode: UInt32 = 0
    public var nlink: UInt32 = 0
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var rdev: UInt32 = 0
    public var blockSize: UInt32 = 0
    public var flags: UInt32 = 0

    public init() {}

    public func encode(into w: inout FuseWriter) {
        w.put(ino)
        w.put(size)
        w.put(blocks)
        w.put(atime)
        w.put(mtime)
        w.put(ctime)
        w.put(atimeNanoseconds)
        w.put(mtimeNanoseconds)
        w.put(ctimeNanoseconds)
        w.put(mode)
        w.put(nlink)
        w.put(uid)
        w.put(gid)
        w.put(rdev)
        w.put(blockSize)
        w.put(flags)
    }

    public static func decode(_ r: inout FuseReader) -> FuseAttr? {
        guard r.remaining >= FuseProtocol.attrSize else { return nil }
        var a = FuseAttr()
        a.ino = r.get() ?? 0
        a.size = r.get() ?? 0
        a.blocks = r.get() ?? 0
        a.atime = r.get() ?? 0
        a.mtime = r.get() ?? 0
        a.ctime = r.get() ?? 0
        a.atimeNanoseconds = r.get() ?? 0
        a.mtimeNanoseconds = r.get() ?? 0
        a.ctimeNanoseconds = r.get() ?? 0
        a.mode = r.get() ?? 0
        a.nlink = r.get() ?? 0
        a.uid = r.get() ?? 0
        a.gid = r.get() ?? 0
        a.rdev = r.get() ?? 0
        a.blockSize = r.get() ?? 0
        a.flags = r.get() ?? 0
        return a
    }
}

/// `struct fuse_entry_out` (128 bytes).
public struct FuseEntryOut: Sendable, Equatable {
    public var nodeID: UInt64 = 0
    public var generation: UInt64 = 0
    public var entryValid: UInt64 = 0
    public var attrValid: UInt64 = 0
    public var entryValidNanoseconds: UInt32 = 0
    public var attrValidNanoseconds: UInt32 = 0
    public var attr = FuseAttr()

    public init() {}

    public func encode(into w: inout FuseWriter) {
        w.put(nodeID)
        w.put(generation)
        w.put(entryValid)
        w.put(attrValid)
        w.put(entryValidNanoseconds)
        w.put(attrValidNanoseconds)
        attr.encode(into: &w)
    }

    public static func decode(_ r: inout FuseReader) -> FuseEntryOut? {
        guard r.remaining >= FuseProtocol.entryOutSize else { return nil }
        var e = FuseEntryOut()
        e.nodeID = r.get() ?? 0
        e.generation = r.get() ?? 0
        e.entryValid = r.get() ?? 0
        e.attrValid = r.get() ?? 0
        e.entryValidNanoseconds = r.get() ?? 0
        e.attrValidNanoseconds = r.get() ?? 0
        guard let attr = FuseAttr.decode(&r) else { return nil }
        e.attr = attr
        return e
    }
}

/// `struct fuse_init_out` (64 bytes).
public struct FuseInitOut: Sendable, Equatable {
    public var major: UInt32 = FuseProtocol.majorVersion
    public var minor: UInt32 = FuseProtocol.minorVersion
    public var maxReadahead: UInt32 = 0
    public var flags: UInt32 = 0
    public var maxBackground: UInt16 = 0
    public var congestionThreshold: UInt16 = 0
    public var maxWrite: UInt32 = 0
    public var timeGranularity: UInt32 = 1
    public var maxPages: UInt16 = 0
    public var mapAlignment: UInt16 = 0
    public var flags2: UInt32 = 0

    public init() {}

    public func encode(into w: inout FuseWriter) {
        w.put(major)
        w.put(minor)
        w.put(maxReadahead)
        w.put(flags)
        w.put(maxBackground)
        w.put(congestionThreshold)
        w.put(maxWrite)
        w.put(timeGranularity)
        w.put(maxPages)
        w.put(mapAlignment)
        w.put(flags2)
        w.zeros(28)
    }

    public static func decode(_ r: inout FuseReader) -> FuseInitOut? {
        guard r.remaining >= FuseProtocol.initOutSize else { return nil }
        var o = FuseInitOut()
        o.major = r.get() ?? 0
        o.minor = r.get() ?? 0
        o.maxReadahead = r.get() ?? 0
        o.flags = r.get() ?? 0
        o.maxBackground = r.get() ?? 0
        o.congestionThreshold = r.get() ?? 0
        o.maxWrite = r.get() ?? 0
        o.timeGranularity = r.get() ?? 0
        o.maxPages = r.get() ?? 0
        o.mapAlignment = r.get() ?? 0
        o.flags2 = r.get() ?? 0
        _ = r.skip(28)
        return o
    }
}

/// `struct fuse_kstatfs` (80 bytes), the STATFS reply.
public struct FuseStatfs: Sendable, Equatable {
    public var blocks: UInt64 = 0
    public var freeBlocks: UInt64 = 0
    public var availableBlocks: UInt64 = 0
    public var files: UInt64 = 0
    public var freeFiles: UInt64 = 0
    public var blockSize: UInt32 = 0
    public var nameLength: UInt32 = 0
    public var fragmentSize: UInt32 = 0

    public init() {}

    public func encode(into w: inout FuseWriter) {
        w.put(blocks)
        w.put(freeBlocks)
        w.put(availableBlocks)
        w.put(files)
        w.put(freeFiles)
        w.put(blockSize)
        w.put(nameLength)
        w.put(fragmentSize)
        w.zeros(28)
    }

    public static func decode(_ r: inout FuseReader) -> FuseStatfs? {
        guard r.remaining >= FuseProtocol.statfsOutSize else { return nil }
        var s = FuseStatfs()
        s.blocks = r.get() ?? 0
        s.freeBlocks = r.get() ?? 0
        s.availableBlocks = r.get() ?? 0
        s.files = r.get() ?? 0
        s.freeFiles = r.get() ?? 0
        s.blockSize = r.get() ?? 0
        s.nameLength = r.get() ?? 0
        s.fragmentSize = r.get() ?? 0
        _ = r.skip(28)
        return s
    }
}

/// `struct virtio_fs_config`: a 36-byte tag (UTF-8, NUL-padded, may fill all 36 bytes
/// without a terminator) and `le32 num_request_queues`. Decoding only reads bytes; the
/// driver validates (`FSInfo.validate`).
public struct FSConfig: Sendable, Equatable {
    public static let size = 40
    public static let tagSize = 36

    public var tag: [UInt8]
    public var numRequestQueues: UInt32

    public init(tag: [UInt8], numRequestQueues: UInt32) {
        self.tag = tag
        self.numRequestQueues = numRequestQueues
    }

    /// The config of a device named `tag` (truncated to 36 bytes).
    public init(tag: String, numRequestQueues: UInt32) {
        self.init(tag: Array(tag.utf8.prefix(Self.tagSize)), numRequestQueues: numRequestQueues)
    }

    public var encoded: [UInt8] {
        var w = FuseWriter(capacity: Self.size)
        w.append(tag.prefix(Self.tagSize))
        w.zeros(Self.tagSize - min(tag.count, Self.tagSize))
        w.put(numRequestQueues)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) -> FSConfig {
        var b = Array(bytes.prefix(size))
        if b.count < size { b += [UInt8](repeating: 0, count: size - b.count) }
        var r = FuseReader(b, offset: tagSize)
        return FSConfig(tag: Array(b[0..<tagSize]), numRequestQueues: r.get(UInt32.self) ?? 0)
    }

    /// GET_CONFIG of `size` bytes from `offset`: bytes past the structure read as zero;
    /// nil outside the config space.
    public func read(offset: UInt32, size: Int) -> [UInt8]? {
        guard size >= 0, size <= 256, offset <= 256 else { return nil }
        let bytes = encoded
        return (0..<size).map { i in
            let o = Int(offset) + i
            return o < bytes.count ? bytes[o] : 0
        }
    }
}
