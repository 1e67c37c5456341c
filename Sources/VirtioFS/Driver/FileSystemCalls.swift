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
    /// LOOKUP of `name` in directory `parent`; ENOENT for a negative entry.
    public func lookup(parent: UInt64, name: String) throws(FSError) -> FSEntry {
        try perform(lookupRequest(parent: parent, name: name))
    }

    func lookupRequest(parent: UInt64, name: String) throws(FSError) -> FSRequest<FSEntry> {
        var w = FuseWriter()
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        return FSRequest(.lookup, nodeID: parent, args: w.bytes, replyLimit: FuseProtocol.entryOutSize) {
            (body) throws(FSError) in
            let entry = try self.deviceCheck { () throws(FSViolation) -> FSEntry? in
                var r = try FSReply.exact(body, FuseProtocol.entryOutSize, "LOOKUP")
                return try FSReply.entry(&r, opcode: "LOOKUP", zeroMeansAbsent: true)
            }
            // nodeid 0: a negative entry, "not found" (never an inode).
            guard let entry else { throw .errno(ENOENT) }
            return try self.remember(entry)
        }
    }

    /// Drops `count` lookup references of `nodeID` (sent in batches on the hiprio queue).
    public func forget(_ nodeID: UInt64, count: UInt64 = 1) throws(FSError) {
        if noteForget(nodeID, count: count) { try flushForgets() }
    }

    /// Records a forget; true when a batch is due.
    func noteForget(_ nodeID: UInt64, count: UInt64) -> Bool {
        guard nodeID != FuseProtocol.rootNodeID, count > 0 else { return false }
        return state.withLock { s -> Bool in
            if let k = s.known[nodeID] {
                if k.lookups <= count { s.known[nodeID] = nil } else { s.known[nodeID] = (k.type, k.lookups - count) }
            }
            s.pendingForgets.append((nodeID, count))
            return s.pendingForgets.count >= max(1, options.forgetBatch)
        }
    }

    /// Sends the pending forgets now: one FORGET, or a BATCH_FORGET.
    public func flushForgets() throws(FSError) {
        guard let (opcode, nodeID, args) = takeForgets() else { return }
        try post(opcode, nodeID: nodeID, args: args)
    }

    /// The pending forgets as one FORGET or BATCH_FORGET (nil: none pending).
    func takeForgets() -> (FuseProtocol.Opcode, UInt64, [UInt8])? {
        let pending = state.withLock { s -> [(nodeID: UInt64, count: UInt64)] in
            defer { s.pendingForgets = [] }
            return s.pendingForgets
        }
        guard !pending.isEmpty else { return nil }
        var w = FuseWriter()
        if pending.count == 1 {
            w.put(pending[0].count)
            return (.forget, pending[0].nodeID, w.bytes)
        }
        w.put(UInt32(pending.count))
        w.put(UInt32(0))
        for p in pending {
            w.put(p.nodeID)
            w.put(p.count)
        }
        return (.batchForget, 0, w.bytes)
    }

    /// GETATTR of `nodeID` (through `handle` if given).
    public func getAttributes(_ nodeID: UInt64, handle: FSHandle? = nil) throws(FSError) -> FileAttributes {
        try perform(getAttributesRequest(nodeID, handle: handle))
    }

    func getAttributesRequest(_ nodeID: UInt64, handle: FSHandle?) -> FSRequest<FileAttributes> {
        var w = FuseWriter()
        w.put(UInt32(handle == nil ? 0 : 1))  // FUSE_GETATTR_FH
        w.put(UInt32(0))
        w.put(handle?.fh ?? 0)
        return FSRequest(.getattr, nodeID: nodeID, args: w.bytes, replyLimit: FuseProtocol.attrOutSize) {
            (body) throws(FSError) in try self.attributesReply(body, nodeID: nodeID, opcode: "GETATTR")
        }
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

    /// SETATTR: applies `changes` to `nodeID`; returns the attributes after.
    public func setAttributes(_ nodeID: UInt64, _ changes: AttributeChanges, handle: FSHandle? = nil)
        throws(FSError) -> FileAttributes
    {
        try perform(setAttributesRequest(nodeID, changes, handle: handle))
    }

    func setAttributesRequest(_ nodeID: UInt64, _ changes: AttributeChanges, handle: FSHandle?)
        -> FSRequest<FileAttributes>
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
        return FSRequest(.setattr, nodeID: nodeID, args: w.bytes, replyLimit: FuseProtocol.attrOutSize) {
            (body) throws(FSError) in try self.attributesReply(body, nodeID: nodeID, opcode: "SETATTR")
        }
    }

    /// OPEN with `flags` (O_RDONLY, O_WRONLY, O_RDWR, O_APPEND, O_TRUNC).
    public func open(_ nodeID: UInt64, flags: Int32 = 0) throws(FSError) -> FSHandle {
        try perform(openRequest(.open, nodeID: nodeID, flags: flags))
    }

    /// OPENDIR of `nodeID`.
    public func openDirectory(_ nodeID: UInt64) throws(FSError) -> FSHandle {
        try perform(openRequest(.opendir, nodeID: nodeID, flags: O_RDONLY))
    }

    func openRequest(_ opcode: FuseProtocol.Opcode, nodeID: UInt64, flags: Int32) -> FSRequest<FSHandle> {
        var w = FuseWriter()
        w.put(UInt32(bitPattern: flags))
        w.put(UInt32(0))
        return FSRequest(opcode, nodeID: nodeID, args: w.bytes, replyLimit: FuseProtocol.openOutSize) {
            (body) throws(FSError) in
            let fh = try self.deviceCheck { () throws(FSViolation) -> UInt64 in
                var r = try FSReply.exact(body, FuseProtocol.openOutSize, "\(opcode)".uppercased())
                return r.get(UInt64.self) ?? 0
            }
            return FSHandle(nodeID: nodeID, fh: fh)
        }
    }

    /// READ of at most `count` bytes (at most `info.maxRead`) at `offset`; fewer at the end.
    public func read(_ handle: FSHandle, at offset: UInt64, count: Int) throws(FSError) -> [UInt8] {
        try perform(readRequest(handle, at: offset, count: count))
    }

    func readRequest(_ handle: FSHandle, at offset: UInt64, count: Int) throws(FSError) -> FSRequest<[UInt8]> {
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
        // The ring bounded the used length by the posted area, so body.count <= count.
        return FSRequest(.read, nodeID: handle.nodeID, args: w.bytes, replyLimit: count) { (body) throws(FSError) in
            Array(body)
        }
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
        try perform(writeRequest(handle, at: offset, count: bytes.count), data: bytes)
    }

    /// WRITE's header and reply check; the data (`count` bytes) follows the arguments.
    func writeRequest(_ handle: FSHandle, at offset: UInt64, count: Int) throws(FSError) -> FSRequest<Int> {
        guard count <= info.maxWrite else {
            throw .invalidRequest("write of \(count) bytes exceeds \(info.maxWrite)")
        }
        var w = FuseWriter(capacity: 40)
        w.put(handle.fh)
        w.put(offset)
        w.put(UInt32(count))
        w.put(UInt32(0))
        w.put(UInt64(0))
        w.put(UInt32(0))
        w.put(UInt32(0))
        return FSRequest(.write, nodeID: handle.nodeID, args: w.bytes, replyLimit: FuseProtocol.writeOutSize) {
            (body) throws(FSError) in
            try self.deviceCheck { () throws(FSViolation) -> Int in
                var r = try FSReply.exact(body, FuseProtocol.writeOutSize, "WRITE")
                let n = r.get(UInt32.self) ?? 0
                guard Int(n) <= count else { throw .writeCount(sent: count, reported: n) }
                return Int(n)
            }
        }
    }

    public func write(_ handle: FSHandle, at offset: UInt64, bytes: [UInt8]) throws(FSError) -> Int {
        try bytes.withUnsafeBytes { b in Result { () throws(FSError) in try write(handle, at: offset, bytes: b) } }
            .get()
    }

    /// RELEASE: closes an open file.
    public func release(_ handle: FSHandle) throws(FSError) { try perform(releaseRequest(.release, handle)) }
    /// RELEASEDIR: closes an open directory.
    public func releaseDirectory(_ handle: FSHandle) throws(FSError) {
        try perform(releaseRequest(.releasedir, handle))
    }

    func releaseRequest(_ opcode: FuseProtocol.Opcode, _ handle: FSHandle) -> FSRequest<Void> {
        var w = FuseWriter(capacity: 24)
        w.put(handle.fh)
        w.put(UInt32(0))
        w.put(UInt32(0))
        w.put(UInt64(0))
        return emptyRequest(opcode, nodeID: handle.nodeID, args: w.bytes)
    }

    /// FLUSH of an open file (on close).
    public func flush(_ handle: FSHandle) throws(FSError) { try perform(flushRequest(handle)) }

    func flushRequest(_ handle: FSHandle) -> FSRequest<Void> {
        var w = FuseWriter(capacity: 24)
        w.put(handle.fh)
        w.put(UInt64(0))
        w.put(UInt64(0))
        return emptyRequest(.flush, nodeID: handle.nodeID, args: w.bytes)
    }

    /// FSYNC of an open file (`dataOnly`: fdatasync).
    public func fsync(_ handle: FSHandle, dataOnly: Bool = false) throws(FSError) {
        try perform(fsyncRequest(handle, dataOnly: dataOnly))
    }

    func fsyncRequest(_ handle: FSHandle, dataOnly: Bool) -> FSRequest<Void> {
        var w = FuseWriter(capacity: 16)
        w.put(handle.fh)
        w.put(UInt32(dataOnly ? 1 : 0))
        w.put(UInt32(0))
        return emptyRequest(.fsync, nodeID: handle.nodeID, args: w.bytes)
    }

    /// A request whose answer has no body.
    func emptyRequest(_ opcode: FuseProtocol.Opcode, nodeID: UInt64, args: [UInt8]) -> FSRequest<Void> {
        FSRequest(opcode, nodeID: nodeID, args: args, replyLimit: 0) { (body) throws(FSError) in
            _ = try self.deviceCheck { () throws(FSViolation) in
                try FSReply.exact(body, 0, "\(opcode)".uppercased())
            }
        }
    }

    /// One READDIRPLUS of at most `size` bytes after the entry at `offset` (0: from the
    /// start). `seen` carries the offsets of this listing so far. Every returned entry
    /// holds a lookup reference. `next` is where the following call starts (nil: the end).
    public func readDirectoryPlus(_ handle: FSHandle, offset: UInt64, size: Int = 64 << 10, seen: inout Set<UInt64>)
        throws(FSError) -> (entries: [DirectoryEntry], next: UInt64?)
    {
        let body = try perform(readDirectoryPlusRequest(handle, offset: offset, size: size))
        return try directoryPlusReply(body, seen: &seen)
    }

    func readDirectoryPlusRequest(_ handle: FSHandle, offset: UInt64, size: Int) -> FSRequest<ArraySlice<UInt8>> {
        let size = max(4096, min(size, info.maxRead))
        var w = FuseWriter(capacity: 40)
        w.put(handle.fh)
        w.put(offset)
        w.put(UInt32(size))
        w.put(UInt32(0))
        w.put(UInt64(0))
        w.put(UInt32(0))
        w.put(UInt32(0))
        return FSRequest(.readdirplus, nodeID: handle.nodeID, args: w.bytes, replyLimit: size) {
            (body) throws(FSError) in body
        }
    }

    /// Checks a READDIRPLUS answer and takes the lookup reference of every entry.
    func directoryPlusReply(_ body: ArraySlice<UInt8>, seen: inout Set<UInt64>)
        throws(FSError) -> (entries: [DirectoryEntry], next: UInt64?)
    {
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
        try perform(createRequest(parent: parent, name: name, permissions: permissions, flags: flags))
    }

    func createRequest(parent: UInt64, name: String, permissions: UInt32, flags: Int32)
        throws(FSError) -> FSRequest<(FSEntry, FSHandle)>
    {
        var w = FuseWriter()
        w.put(UInt32(bitPattern: flags | O_CREAT))
        w.put(FuseProtocol.FileType.regular.rawValue | (permissions & 0o7777))
        w.put(UInt32(0))  // umask
        w.put(UInt32(0))
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        let size = FuseProtocol.entryOutSize + FuseProtocol.openOutSize
        return FSRequest(.create, nodeID: parent, args: w.bytes, replyLimit: size) { (body) throws(FSError) in
            let (entry, fh) = try self.deviceCheck { () throws(FSViolation) -> (FSEntry, UInt64) in
                var r = try FSReply.exact(body, size, "CREATE")
                guard let entry = try FSReply.entry(&r, opcode: "CREATE", zeroMeansAbsent: false) else {
                    throw .nodeIDInvalid(opcode: "CREATE", nodeID: 0)
                }
                return (entry, r.get(UInt64.self) ?? 0)
            }
            return (try self.remember(entry), FSHandle(nodeID: entry.nodeID, fh: fh))
        }
    }

    /// MKDIR `name` in `parent`.
    public func makeDirectory(parent: UInt64, name: String, permissions: UInt32 = 0o755) throws(FSError) -> FSEntry {
        try perform(makeDirectoryRequest(parent: parent, name: name, permissions: permissions))
    }

    func makeDirectoryRequest(parent: UInt64, name: String, permissions: UInt32) throws(FSError) -> FSRequest<FSEntry> {
        var w = FuseWriter()
        w.put(FuseProtocol.FileType.directory.rawValue | (permissions & 0o7777))
        w.put(UInt32(0))
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        return entryRequest(.mkdir, parent: parent, args: w.bytes)
    }

    /// SYMLINK: `name` in `parent`, pointing at `target`.
    public func symlink(parent: UInt64, name: String, target: String) throws(FSError) -> FSEntry {
        try perform(symlinkRequest(parent: parent, name: name, target: target))
    }

    func symlinkRequest(parent: UInt64, name: String, target: String) throws(FSError) -> FSRequest<FSEntry> {
        let t = Array(target.utf8)
        guard !t.isEmpty, t.count <= FuseProtocol.maximumLinkLength, !t.contains(0) else {
            throw .invalidRequest("symlink target of \(t.count) bytes")
        }
        var w = FuseWriter()
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        w.append(t)
        w.put(UInt8(0))
        return entryRequest(.symlink, parent: parent, args: w.bytes)
    }

    func entryRequest(_ opcode: FuseProtocol.Opcode, parent: UInt64, args: [UInt8]) -> FSRequest<FSEntry> {
        let name = "\(opcode)".uppercased()
        return FSRequest(opcode, nodeID: parent, args: args, replyLimit: FuseProtocol.entryOutSize) {
            (body) throws(FSError) in
            let entry = try self.deviceCheck { () throws(FSViolation) -> FSEntry in
                var r = try FSReply.exact(body, FuseProtocol.entryOutSize, name)
                guard let e = try FSReply.entry(&r, opcode: name, zeroMeansAbsent: false) else {
                    throw .nodeIDInvalid(opcode: name, nodeID: 0)
                }
                return e
            }
            return try self.remember(entry)
        }
    }

    /// UNLINK of the file or symlink `name` in `parent`.
    public func unlink(parent: UInt64, name: String) throws(FSError) {
        try perform(nameRequest(.unlink, parent: parent, name: name))
    }

    /// RMDIR of the empty directory `name` in `parent`.
    public func removeDirectory(parent: UInt64, name: String) throws(FSError) {
        try perform(nameRequest(.rmdir, parent: parent, name: name))
    }

    func nameRequest(_ opcode: FuseProtocol.Opcode, parent: UInt64, name: String) throws(FSError) -> FSRequest<Void> {
        var w = FuseWriter()
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        return emptyRequest(opcode, nodeID: parent, args: w.bytes)
    }

    /// RENAME2 (`flags`: `FuseProtocol.RenameFlag`).
    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: UInt32 = 0)
        throws(FSError)
    {
        try perform(renameRequest(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags))
    }

    func renameRequest(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: UInt32)
        throws(FSError) -> FSRequest<Void>
    {
        var w = FuseWriter()
        w.put(newParent)
        w.put(flags)
        w.put(UInt32(0))
        w.append(try Self.checkName(name))
        w.put(UInt8(0))
        w.append(try Self.checkName(newName))
        w.put(UInt8(0))
        return emptyRequest(.rename2, nodeID: parent, args: w.bytes)
    }

    /// STATFS of the file system.
    public func statistics() throws(FSError) -> FSStatistics { try perform(statisticsRequest()) }

    func statisticsRequest() -> FSRequest<FSStatistics> {
        FSRequest(.statfs, nodeID: FuseProtocol.rootNodeID, args: [], replyLimit: FuseProtocol.statfsOutSize) {
            (body) throws(FSError) in
            try self.deviceCheck { () throws(FSViolation) -> FuseStatfs in
                var r = try FSReply.exact(body, FuseProtocol.statfsOutSize, "STATFS")
                return FuseStatfs.decode(&r) ?? FuseStatfs()
            }
        }
    }

    /// READLINK: the target of the symlink `nodeID`.
    public func readLink(_ nodeID: UInt64) throws(FSError) -> String { try perform(readLinkRequest(nodeID)) }

    func readLinkRequest(_ nodeID: UInt64) -> FSRequest<String> {
        FSRequest(.readlink, nodeID: nodeID, args: [], replyLimit: FuseProtocol.maximumLinkLength) {
            (body) throws(FSError) in
            try self.deviceCheck { () throws(FSViolation) -> String in
                guard !body.contains(0) else { throw .linkTarget(length: body.count) }
                return String(decoding: body, as: UTF8.self)
            }
        }
    }
}

/// One FUSE request as built by a call: what goes out and how its answer is checked.
/// The synchronous calls run it on a request queue (`perform`), the async ones on the
/// I/O thread; both check the answer with the same `parse`.
struct FSRequest<Value> {
    let opcode: FuseProtocol.Opcode
    let nodeID: UInt64
    let args: [UInt8]
    /// Largest reply body accepted (bytes after `fuse_out_header`).
    let replyLimit: Int
    /// Checks the body (header already checked) and makes the call's value.
    let parse: (ArraySlice<UInt8>) throws(FSError) -> Value

    init(
        _ opcode: FuseProtocol.Opcode, nodeID: UInt64, args: [UInt8], replyLimit: Int,
        parse: @escaping (ArraySlice<UInt8>) throws(FSError) -> Value
    ) {
        self.opcode = opcode
        self.nodeID = nodeID
        self.args = args
        self.replyLimit = replyLimit
        self.parse = parse
    }
}

extension VirtioFSDriver {
    /// Runs `request` on a request queue (the synchronous path); `data` follows the
    /// arguments (WRITE).
    func perform<Value>(_ request: FSRequest<Value>, data: UnsafeRawBufferPointer? = nil) throws(FSError) -> Value {
        let body = try call(
            request.opcode, nodeID: request.nodeID, args: request.args, data: data, replyLimit: request.replyLimit)
        return try request.parse(body)
    }
}
