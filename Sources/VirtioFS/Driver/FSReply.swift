import SharedMemory

/// File attributes after validation: a known file type, a size that fits Int64.
public struct FileAttributes: Sendable, Equatable {
    public let nodeID: UInt64
    public let type: FuseProtocol.FileType
    /// Permission bits (mode without the type).
    public let permissions: UInt32
    public let size: Int64
    public let blocks: UInt64
    public let links: UInt32
    public let uid: UInt32
    public let gid: UInt32
    public let modificationTime: (seconds: UInt64, nanoseconds: UInt32)
    public let inodeNumber: UInt64

    public static func == (a: FileAttributes, b: FileAttributes) -> Bool {
        a.nodeID == b.nodeID && a.type == b.type && a.permissions == b.permissions && a.size == b.size
            && a.blocks == b.blocks && a.links == b.links && a.uid == b.uid && a.gid == b.gid
            && a.modificationTime == b.modificationTime && a.inodeNumber == b.inodeNumber
    }

    /// Validates one `fuse_attr` of `nodeID` (R3).
    public static func validate(_ a: FuseAttr, nodeID: UInt64) throws(FSViolation) -> FileAttributes {
        guard let type = FuseProtocol.FileType(mode: a.mode) else {
            throw .attributeType(nodeID: nodeID, mode: a.mode)
        }
        guard a.size <= UInt64(Int64.max) else { throw .attributeSize(nodeID: nodeID, size: a.size) }
        return FileAttributes(
            nodeID: nodeID, type: type, permissions: a.mode & 0o7777, size: Int64(a.size), blocks: a.blocks,
            links: a.nlink, uid: a.uid, gid: a.gid, modificationTime: (a.mtime, a.mtimeNanoseconds),
            inodeNumber: a.ino)
    }
}

/// A looked-up (or created) inode: its nodeid, with one lookup reference the device counts
/// until it is forgotten, and its attributes.
public struct FSEntry: Sendable, Equatable {
    public let nodeID: UInt64
    public let generation: UInt64
    public let attributes: FileAttributes
}

/// One READDIRPLUS entry ("." and ".." are never returned).
public struct DirectoryEntry: Sendable, Equatable {
    public let name: String
    /// The entry's offset cookie: the next listing starts after it.
    public let offset: UInt64
    public let entry: FSEntry
}

/// The checks every reply passes, on a private copy of what the device wrote (R2: the
/// device may rewrite shared memory after the copy; only the copy is looked at).
public enum FSReply {
    /// Checks the header of a reply of `usedLength` bytes (already at most what was
    /// posted) to the request `unique`: the used length equals the header's len, the
    /// unique matches, the error is in (-4096, 0] and an error has no body. Returns the
    /// negated errno (0 on success) and the body.
    public static func checkHeader(_ reply: [UInt8], usedLength: UInt32, unique: UInt64) throws(FSViolation) -> (
        error: Int32, body: ArraySlice<UInt8>
    ) {
        // The caller's copy holds the used length (found by FuzzFuseReplies: a shorter
        // copy trapped when the body was cut out).
        guard Int(usedLength) <= reply.count else { throw .replyTooShort(usedLength: UInt32(clamping: reply.count)) }
        let error = try checkHeader(prefix: reply, usedLength: usedLength, unique: unique)
        if error != 0 { return (error, []) }
        return (0, reply[FuseProtocol.outHeaderSize..<Int(usedLength)])
    }

    /// The same checks on a private copy of the reply header alone (`prefix`: at least
    /// its 16 bytes when the used length has them), for a reply whose body went straight
    /// into the caller's buffer (READ into a buffer). Returns the negated errno (0 on
    /// success); the body is the used length minus the header.
    public static func checkHeader(prefix: [UInt8], usedLength: UInt32, unique: UInt64) throws(FSViolation) -> Int32 {
        var r = FuseReader(prefix)
        guard usedLength >= UInt32(FuseProtocol.outHeaderSize), let header = FuseOutHeader.decode(&r) else {
            throw .replyTooShort(usedLength: usedLength)
        }
        guard header.length == usedLength else {
            throw .replyLengthMismatch(usedLength: usedLength, headerLength: header.length)
        }
        guard header.unique == unique else { throw .uniqueMismatch(expected: unique, got: header.unique) }
        guard header.error <= 0, header.error > FuseProtocol.errorLimit else { throw .errorOutOfRange(header.error) }
        if header.error != 0 {
            guard header.length == UInt32(FuseProtocol.outHeaderSize) else {
                throw .errorWithBody(length: header.length)
            }
            return header.error
        }
        return 0
    }

    /// A fixed-size body must be exactly `size` bytes.
    public static func exact(_ body: ArraySlice<UInt8>, _ size: Int, _ opcode: String) throws(FSViolation) -> FuseReader
    {
        guard body.count == size else { throw .replySize(opcode: opcode, expected: size, got: body.count) }
        return FuseReader(Array(body))
    }

    /// An entry reply (LOOKUP, CREATE's first part, MKDIR, SYMLINK): nodeid must not be
    /// 0 (unless `zeroMeansAbsent`, LOOKUP's negative entry: nil) nor the root.
    public static func entry(_ r: inout FuseReader, opcode: String, zeroMeansAbsent: Bool) throws(FSViolation)
        -> FSEntry?
    {
        guard let e = FuseEntryOut.decode(&r) else {
            throw .replySize(opcode: opcode, expected: FuseProtocol.entryOutSize, got: r.remaining)
        }
        if e.nodeID == 0 && zeroMeansAbsent { return nil }
        guard e.nodeID != 0, e.nodeID != FuseProtocol.rootNodeID else {
            throw .nodeIDInvalid(opcode: opcode, nodeID: e.nodeID)
        }
        return FSEntry(
            nodeID: e.nodeID, generation: e.generation,
            attributes: try FileAttributes.validate(e.attr, nodeID: e.nodeID))
    }

    /// READDIRPLUS: entries parsed only while a whole header remains; each name 1...255
    /// bytes without '/' or NUL, its padded length inside the body; "." and ".." skipped;
    /// nodeids 0 and 1 refused; every offset nonzero and new to this listing (`seen`: an
    /// offset that comes back would restart the listing forever; offsets are hash cookies
    /// on many file systems, so they need not grow). Trailing bytes shorter than a header
    /// are ignored (Linux does the same).
    /// Returns the entries and the last entry's offset (nil: an empty reply, the end).
    public static func directoryPlus(_ body: ArraySlice<UInt8>, seen: inout Set<UInt64>) throws(FSViolation)
        -> (entries: [DirectoryEntry], last: UInt64?)
    {
        let bytes = Array(body)
        var entries: [DirectoryEntry] = []
        var last: UInt64?
        var at = 0
        while bytes.count - at >= FuseProtocol.direntplusHeaderSize {
            var r = FuseReader(bytes, offset: at)
            guard let e = FuseEntryOut.decode(&r), let ino = r.get(UInt64.self), let off = r.get(UInt64.self),
                let nameLength = r.get(UInt32.self), let type = r.get(UInt32.self)
            else { break }
            _ = ino
            _ = type
            guard nameLength >= 1, nameLength <= UInt32(FuseProtocol.maximumNameLength) else {
                throw .direntNameLength(nameLength)
            }
            let unpadded = FuseProtocol.direntplusHeaderSize + Int(nameLength)
            let padded = (unpadded + 7) & ~7
            guard padded <= bytes.count - at else {
                throw .direntPastBuffer(offset: at, length: padded, buffer: bytes.count)
            }
            let name = bytes[(at + FuseProtocol.direntplusHeaderSize)..<(at + unpadded)]
            guard !name.contains(0x2f), !name.contains(0) else {
                throw .direntName(String(decoding: name, as: UTF8.self))
            }
            guard off != 0, seen.insert(off).inserted else { throw .direntOffset(offset: off) }
            last = off
            at += padded
            if name.elementsEqual([0x2e]) || name.elementsEqual([0x2e, 0x2e]) { continue }
            guard e.nodeID != 0, e.nodeID != FuseProtocol.rootNodeID else {
                throw .nodeIDInvalid(opcode: "READDIRPLUS", nodeID: e.nodeID)
            }
            let attributes = try FileAttributes.validate(e.attr, nodeID: e.nodeID)
            entries.append(
                DirectoryEntry(
                    name: String(decoding: name, as: UTF8.self), offset: off,
                    entry: FSEntry(nodeID: e.nodeID, generation: e.generation, attributes: attributes)))
        }
        return (entries, last)
    }
}
