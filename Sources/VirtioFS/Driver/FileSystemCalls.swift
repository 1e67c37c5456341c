#if canImport(Glibc)
import Glibc
#endif

/// An open file or directory: the device's handle for `nodeID`.
public struct FSHandle: Sendable, Equatable {
    public let nodeID: UInt64
    public let fh: UInt64
}

/// `statfs` as the device reports it.
public typealias FSStatistics = FuseStatfs

/// The FUSE operations, one request each. A returned `FSEntry` carries one lookup
/// reference: `forget` it when done (the path calls do this themselves).
extension VirtioFSDriver {
    public func lookup(parent: UInt64, name: String) throws(FSError) -> FSEntry {
        var w = FuseWriter()
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        let body = try call(.lookup, nodeID: parent, args: w.bytes, replyLimit: FuseProtocol.entryOutSize)
        let entry = try deviceCheck { () throws(FSViolation) -> FSEntry? in
            var r = try FSReply.exact(body, FuseProtocol.entryOutSize, "LOOKUP")
            return try FSReply.entry(&r, opcode: "LOOKUP", zeroMeansAbsent: true)
        }
        // nodeid 0: a negative entry, "not found" (never an inode).
        guard let entry else { throw .errno(ENOENT) }
        return try remember(entry)
    }

    /// Drops `count` lookup references of `nodeID` (sent in batches on the hiprio queue).
    public func forget(_ nodeID: UInt64, count: UInt64 = 1) throws(FSError) {
        guard nodeID != FuseProtocol.rootNodeID, count > 0 else { return }
        let flush = state.withLock { s -> Bool in
            if let k = s.known[nodeID] {
                if k.lookups <= count { s.known[nodeID] = nil } else { s.known[nodeID] = (k.type, k.lookups - count) }
            }
            s.pendingForgets.append((nodeID, count))
            return s.pendingForgets.count >= max(1, options.forgetBatch)
        }
        if flush { try flushForgets() }
    }

    /// Sends the pending forgets now: one FORGET, or a BATCH_FORGET.
    public func flushForgets() throws(FSError) {
        let pending = state.withLock { s -> [(nodeID: UInt64, count: UInt64)] in
            defer { s.pendingForgets = [] }
            return s.pendingForgets
        }
        guard !pending.isEmpty else { return }
        var w = FuseWriter()
        if pending.count == 1 {
            w.put(pending[0].count)
            try post(.forget, nodeID: pending[0].nodeID, args: w.bytes)
            return
        }
        w.put(UInt32(pending.count))
        w.put(UInt32(0))
        for p in pending {
            w.put(p.nodeID)
            w.put(p.count)
        }
        try post(.batchForget, nodeID: 0, args: w.bytes)
    }

    public func getAttributes(_ nodeID: UInt64, handle: FSHandle? = nil) throws(FSError) -> FileAttributes {
        var w = FuseWriter()
        w.put(UInt32(handle == nil ? 0 : 1))  // FUSE_GETATTR_FH
        w.put(UInt32(0))
        w.put(handle?.fh ?? 0)
        let body = try call(.getattr, nodeID: nodeID, args: w.bytes, replyLimit: FuseProtocol.attrOutSize)
        return try attributesReply(body, nodeID: nodeID, opcode: "GETATTR")
    }

    func attributesReply(_ body: ArraySlice<UInt8>, nodeID: UInt64, opcode: String) throws(FSError) -> FileAttributes {
        let a = try deviceCheck { () throws(FSViolation) -> FileAttributes in
            var r = try FSReply.exact(body, FuseProtocol.attrOutSize, opcode)
            _ = r.skip(16)
            return try FileAttributes.validate(FuseAttr.decode(&r) ?? FuseAttr(), nodeID: nodeID)
        }
        try note(a, addingLookup: false)
        return a
    }

    /// What SETATTR changes (nil: unchanged).
    public struct AttributeChanges: Sendable {
        public var size: UInt64?
        public var permissions: UInt32?
        public var uid: UInt32?
        public var gid: UInt32?
        public var modificationTime: (seconds: UInt64, nanoseconds: UInt32)?
        public init(size: UInt64? = nil, permissions: UInt32? = nil) {
            self.size = size
            self.permissions = permissions
        }
    }

    public func setAttributes(_ nodeID: UInt64, _ changes: AttributeChanges, handle: FSHandle? = nil)
        throws(FSError) -> FileAttributes
    {
        typealias V = FuseProtocol.SetattrValid
        var valid: UInt32 = 0
        if changes.size != nil { valid |= V.size }
        if changes.permissions != nil { valid |= V.mode }
        if changes.uid != nil { valid |= V.uid }
        if changes.gid != nil { valid |= V.gid }
        if changes.modificationTime != nil { valid |= V.mtime }
        if handle != nil { valid |= V.fh }
        var w = FuseWriter(capacity: 88)
        w.put(valid)
        w.put(UInt32(0))
        w.put(handle?.fh ?? 0)
        w.put(changes.size ?? 0)
        w.put(UInt64(0))  // lock_owner
        w.put(UInt64(0))  // atime
        w.put(changes.modificationTime?.seconds ?? 0)
        w.put(UInt64(0))  // ctime
        w.put(UInt32(0))
        w.put(changes.modificationTime?.nanoseconds ?? 0)
        w.put(UInt32(0))
        w.put(changes.permissions.map { $0 & 0o7777 } ?? 0)
        w.put(UInt32(0))
        w.put(changes.uid ?? 0)
        w.put(changes.gid ?? 0)
        w.put(UInt32(0))
        let body = try call(.setattr, nodeID: nodeID, args: w.bytes, replyLimit: FuseProtocol.attrOutSize)
        return try attributesReply(body, nodeID: nodeID, opcode: "SETATTR")
    }

    /// OPEN with `flags` (O_RDONLY, O_WRONLY, O_RDWR, O_APPEND, O_TRUNC).
    public func open(_ nodeID: UInt64, flags: Int32 = 0) throws(FSError) -> FSHandle {
        try openReply(.open, nodeID: nodeID, flags: flags)
    }

    public func openDirectory(_ nodeID: UInt64) throws(FSError) -> FSHandle {
        try openReply(.opendir, nodeID: nodeID, flags: O_RDONLY)
    }

    func openReply(_ opcode: FuseProtocol.Opcode, nodeID: UInt64, flags: Int32) throws(FSError) -> FSHandle {
        var w = FuseWriter()
        w.put(UInt32(bitPattern: flags))
        w.put(UInt32(0))
        let body = try call(opcode, nodeID: nodeID, args: w.bytes, replyLimit: FuseProtocol.openOutSize)
        let fh = try deviceCheck { () throws(FSViolation) -> UInt64 in
            var r = try FSReply.exact(body, FuseProtocol.openOutSize, "\(opcode)".uppercased())
            return r.get(UInt64.self) ?? 0
        }
        return FSHandle(nodeID: nodeID, fh: fh)
    }

    /// READ of at most `count` bytes (at most `info.maxRead`) at `offset`; fewer at the end.
    public func read(_ handle: FSHandle, at offset: UInt64, count: Int) throws(FSError) -> [UInt8] {
        guard count >= 0, count <= info.maxRead else {
            throw .invalidRequest("read of \(count) bytes exceeds \(info.maxRead)")
        }
        var w = FuseWriter(capacity: 40)
        w.put(handle.fh)
        w.put(offset)
        w.put(UInt32(count))
        w.put(UInt32(0))
        w.put(UInt64(0))
        w.put(UInt32(0))
        w.put(UInt32(0))
        let body = try call(.read, nodeID: handle.nodeID, args: w.bytes, replyLimit: count)
        // The ring bounded the used length by the posted area, so body.count <= count.
        return Array(body)
    }

    /// READ of at most `buffer.count` bytes (at most `info.maxRead`) at `offset`, copied
    /// once from the bounce buffer straight into `buffer` (no allocation); returns the
    /// count read (fewer at the end of the file). The reply header is checked as every
    /// reply's is; on an error the buffer's contents are unspecified.
    public func read(_ handle: FSHandle, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
        throws(FSError) -> Int
    {
        let count = buffer.count
        guard count <= info.maxRead else {
            throw .invalidRequest("read of \(count) bytes exceeds \(info.maxRead)")
        }
        var w = FuseWriter(capacity: 40)
        w.put(handle.fh)
        w.put(offset)
        w.put(UInt32(count))
        w.put(UInt32(0))
        w.put(UInt64(0))
        w.put(UInt32(0))
        w.put(UInt32(0))
        // The ring bounded the used length by the posted area, so the count is <= count.
        return try call(.read, nodeID: handle.nodeID, args: w.bytes, replyLimit: count, into: buffer)
    }

    /// WRITE of `bytes` (at most `info.maxWrite`) at `offset`; returns the count written.
    public func write(_ handle: FSHandle, at offset: UInt64, bytes: UnsafeRawBufferPointer) throws(FSError) -> Int {
        guard bytes.count <= info.maxWrite else {
            throw .invalidRequest("write of \(bytes.count) bytes exceeds \(info.maxWrite)")
        }
        var w = FuseWriter(capacity: 40)
        w.put(handle.fh)
        w.put(offset)
        w.put(UInt32(bytes.count))
        w.put(UInt32(0))
        w.put(UInt64(0))
        w.put(UInt32(0))
        w.put(UInt32(0))
        let body = try call(
            .write, nodeID: handle.nodeID, args: w.bytes, data: bytes, replyLimit: FuseProtocol.writeOutSize)
        return try deviceCheck { () throws(FSViolation) -> Int in
            var r = try FSReply.exact(body, FuseProtocol.writeOutSize, "WRITE")
            let n = r.get(UInt32.self) ?? 0
            guard Int(n) <= bytes.count else { throw .writeCount(sent: bytes.count, reported: n) }
            return Int(n)
        }
    }

    public func write(_ handle: FSHandle, at offset: UInt64, bytes: [UInt8]) throws(FSError) -> Int {
        try bytes.withUnsafeBytes { b in Result { () throws(FSError) in try write(handle, at: offset, bytes: b) } }
            .get()
    }

    public func release(_ handle: FSHandle) throws(FSError) { try releaseCall(.release, handle) }
    public func releaseDirectory(_ handle: FSHandle) throws(FSError) { try releaseCall(.releasedir, handle) }

    func releaseCall(_ opcode: FuseProtocol.Opcode, _ handle: FSHandle) throws(FSError) {
        var w = FuseWriter(capacity: 24)
        w.put(handle.fh)
        w.put(UInt32(0))
        w.put(UInt32(0))
        w.put(UInt64(0))
        try empty(call(opcode, nodeID: handle.nodeID, args: w.bytes, replyLimit: 0), "\(opcode)")
    }

    public func flush(_ handle: FSHandle) throws(FSError) {
        var w = FuseWriter(capacity: 24)
        w.put(handle.fh)
        w.put(UInt64(0))
        w.put(UInt64(0))
        try empty(call(.flush, nodeID: handle.nodeID, args: w.bytes, replyLimit: 0), "FLUSH")
    }

    public func fsync(_ handle: FSHandle, dataOnly: Bool = false) throws(FSError) {
        var w = FuseWriter(capacity: 16)
        w.put(handle.fh)
        w.put(UInt32(dataOnly ? 1 : 0))
        w.put(UInt32(0))
        try empty(call(.fsync, nodeID: handle.nodeID, args: w.bytes, replyLimit: 0), "FSYNC")
    }

    func empty(_ body: ArraySlice<UInt8>, _ opcode: String) throws(FSError) {
        _ = try deviceCheck { () throws(FSViolation) in try FSReply.exact(body, 0, opcode.uppercased()) }
    }

    /// One READDIRPLUS of at most `size` bytes after the entry at `offset` (0: from the
    /// start). `seen` carries the offsets of this listing so far. Every returned entry
    /// holds a lookup reference. `next` is where the following call starts (nil: the end).
    public func readDirectoryPlus(_ handle: FSHandle, offset: UInt64, size: Int = 64 << 10, seen: inout Set<UInt64>)
        throws(FSError) -> (entries: [DirectoryEntry], next: UInt64?)
    {
        let size = max(4096, min(size, info.maxRead))
        var w = FuseWriter(capacity: 40)
        w.put(handle.fh)
        w.put(offset)
        w.put(UInt32(size))
        w.put(UInt32(0))
        w.put(UInt64(0))
        w.put(UInt32(0))
        w.put(UInt32(0))
        let body = try call(.readdirplus, nodeID: handle.nodeID, args: w.bytes, replyLimit: size)
        var listed = seen
        let (entries, last) = try deviceCheck { () throws(FSViolation) in
            let parsed = try FSReply.directoryPlus(body, seen: &listed)
            guard listed.count <= Self.maximumListing else { throw .listingTooLong(entries: Self.maximumListing) }
            return parsed
        }
        seen = listed
        for e in entries { _ = try remember(e.entry) }
        return (entries, last)
    }

    /// CREATE: a new regular file `name` in `parent`, opened with `flags`.
    public func create(parent: UInt64, name: String, permissions: UInt32 = 0o644, flags: Int32 = 2)
        throws(FSError) -> (FSEntry, FSHandle)
    {
        var w = FuseWriter()
        w.put(UInt32(bitPattern: flags | O_CREAT))
        w.put(FuseProtocol.FileType.regular.rawValue | (permissions & 0o7777))
        w.put(UInt32(0))  // umask
        w.put(UInt32(0))
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        let size = FuseProtocol.entryOutSize + FuseProtocol.openOutSize
        let body = try call(.create, nodeID: parent, args: w.bytes, replyLimit: size)
        let (entry, fh) = try deviceCheck { () throws(FSViolation) -> (FSEntry, UInt64) in
            var r = try FSReply.exact(body, size, "CREATE")
            guard let entry = try FSReply.entry(&r, opcode: "CREATE", zeroMeansAbsent: false) else {
                throw .nodeIDInvalid(opcode: "CREATE", nodeID: 0)
            }
            return (entry, r.get(UInt64.self) ?? 0)
        }
        return (try remember(entry), FSHandle(nodeID: entry.nodeID, fh: fh))
    }

    public func makeDirectory(parent: UInt64, name: String, permissions: UInt32 = 0o755) throws(FSError) -> FSEntry {
        var w = FuseWriter()
        w.put(FuseProtocol.FileType.directory.rawValue | (permissions & 0o7777))
        w.put(UInt32(0))
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        return try entryCall(.mkdir, parent: parent, args: w.bytes)
    }

    public func symlink(parent: UInt64, name: String, target: String) throws(FSError) -> FSEntry {
        let t = Array(target.utf8)
        guard !t.isEmpty, t.count <= FuseProtocol.maximumLinkLength, !t.contains(0) else {
            throw .invalidRequest("symlink target of \(t.count) bytes")
        }
        var w = FuseWriter()
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        w.append(t)
        w.put(UInt8(0))
        return try entryCall(.symlink, parent: parent, args: w.bytes)
    }

    func entryCall(_ opcode: FuseProtocol.Opcode, parent: UInt64, args: [UInt8]) throws(FSError) -> FSEntry {
        let name = "\(opcode)".uppercased()
        let body = try call(opcode, nodeID: parent, args: args, replyLimit: FuseProtocol.entryOutSize)
        let entry = try deviceCheck { () throws(FSViolation) -> FSEntry in
            var r = try FSReply.exact(body, FuseProtocol.entryOutSize, name)
            guard let e = try FSReply.entry(&r, opcode: name, zeroMeansAbsent: false) else {
                throw .nodeIDInvalid(opcode: name, nodeID: 0)
            }
            return e
        }
        return try remember(entry)
    }

    public func unlink(parent: UInt64, name: String) throws(FSError) {
        try nameCall(.unlink, parent: parent, name: name)
    }

    public func removeDirectory(parent: UInt64, name: String) throws(FSError) {
        try nameCall(.rmdir, parent: parent, name: name)
    }

    func nameCall(_ opcode: FuseProtocol.Opcode, parent: UInt64, name: String) throws(FSError) {
        var w = FuseWriter()
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        try empty(call(opcode, nodeID: parent, args: w.bytes, replyLimit: 0), "\(opcode)")
    }

    /// RENAME2 (`flags`: `FuseProtocol.RenameFlag`).
    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: UInt32 = 0)
        throws(FSError)
    {
        var w = FuseWriter()
        w.put(newParent)
        w.put(flags)
        w.put(UInt32(0))
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        w.append(try Self.checkName(newName))
        w.put(UInt8(0))
        try empty(call(.rename2, nodeID: parent, args: w.bytes, replyLimit: 0), "RENAME2")
    }

    public func statistics() throws(FSError) -> FSStatistics {
        let body = try call(.statfs, nodeID: FuseProtocol.rootNodeID, args: [], replyLimit: FuseProtocol.statfsOutSize)
        return try deviceCheck { () throws(FSViolation) -> FuseStatfs in
            var r = try FSReply.exact(body, FuseProtocol.statfsOutSize, "STATFS")
            return FuseStatfs.decode(&r) ?? FuseStatfs()
        }
    }

    public func readLink(_ nodeID: UInt64) throws(FSError) -> String {
        let body = try call(.readlink, nodeID: nodeID, args: [], replyLimit: FuseProtocol.maximumLinkLength)
        return try deviceCheck { () throws(FSViolation) -> String in
            guard !body.contains(0) else { throw .linkTarget(length: body.count) }
            return String(decoding: body, as: UTF8.self)
        }
    }
}
