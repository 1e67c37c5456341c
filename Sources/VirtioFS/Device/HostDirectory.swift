#if canImport(Glibc)
import Glibc
#endif
import CRingFence

/// The directory a `VirtioFSDevice` serves, as the driver may see it: a bounded table of
/// inodes (nodeid -> O_PATH descriptor) and of open handles. Every path operation takes
/// one validated name relative to a directory inode's descriptor and resolves it with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)` or an `*at`
/// call that does not follow the name, so no name or nodeid the driver sends reaches
/// outside the directory: no '/', no "." or "..", no symlink followed. Nodeids are ours
/// (never host inode numbers) and die with FORGET, so a driver that never forgets hits
/// `maximumInodes` (ENFILE) instead of exhausting memory or descriptors.
///
/// Not thread-safe: the device serializes calls (one lock for all queues).
final class HostDirectory {
    struct Inode {
        let descriptor: Int32
        let type: FuseProtocol.FileType
        let device: UInt64
        let inode: UInt64
        var lookups: UInt64
    }

    struct Key: Hashable {
        let device: UInt64
        let inode: UInt64
    }

    /// An open file or directory. A struct rather than an enum with payloads: in such an
    /// enum Swift keeps the case in the spare bits of the names array's pointer, which
    /// LeakSanitizer cannot follow, so the fuzzer reported every held snapshot as a leak.
    struct Handle {
        let node: UInt64
        /// The open file's descriptor; nil for a directory.
        let descriptor: Int32?
        /// A directory's names at OPENDIR ("." and ".." left out; offsets are indices);
        /// nil for a file.
        let names: [[UInt8]]?

        static func file(descriptor: Int32, node: UInt64) -> Handle {
            Handle(node: node, descriptor: descriptor, names: nil)
        }

        static func directory(names: [[UInt8]], node: UInt64) -> Handle {
            Handle(node: node, descriptor: nil, names: names)
        }
    }

    let rootDescriptor: Int32
    /// /proc/self/fd, to reopen an O_PATH descriptor with real access (regular files and
    /// directories only: the type was fixed when the inode was looked up).
    let procDescriptor: Int32
    let readOnly: Bool
    let maximumInodes: Int
    let maximumHandles: Int
    let maximumDirectoryEntries: Int
    var inodes: [UInt64: Inode] = [:]
    var byKey: [Key: UInt64] = [:]
    var nextNode: UInt64 = 2
    var handles: [UInt64: Handle] = [:]
    var nextHandle: UInt64 = 1

    static let resolve = RF_RESOLVE_BENEATH | RF_RESOLVE_NO_MAGICLINKS | RF_RESOLVE_NO_SYMLINKS

    init(path: String, readOnly: Bool, maximumInodes: Int, maximumHandles: Int, maximumDirectoryEntries: Int)
        throws(FSError)
    {
        let root = Glibc.open(path, RF_O_PATH | RF_O_DIRECTORY | O_CLOEXEC)
        guard root >= 0 else { throw .system("open(\(path)): \(String(cString: strerror(errno)))") }
        let proc = Glibc.open("/proc/self/fd", RF_O_PATH | RF_O_DIRECTORY | O_CLOEXEC)
        guard proc >= 0 else {
            close(root)
            throw .system("open(/proc/self/fd): \(String(cString: strerror(errno)))")
        }
        rootDescriptor = root
        procDescriptor = proc
        self.readOnly = readOnly
        self.maximumInodes = max(2, maximumInodes)
        self.maximumHandles = max(1, maximumHandles)
        self.maximumDirectoryEntries = max(1, maximumDirectoryEntries)
        var st = stat()
        _ = fstat(root, &st)
        inodes[FuseProtocol.rootNodeID] = Inode(
            descriptor: root, type: .directory, device: UInt64(st.st_dev), inode: UInt64(st.st_ino), lookups: 1)
        byKey[Key(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))] = FuseProtocol.rootNodeID
    }

    deinit { reset() }

    /// Drops every inode but the root and every handle (the driver went away).
    func reset() {
        for (node, i) in inodes where node != FuseProtocol.rootNodeID { close(i.descriptor) }
        for h in handles.values { closeHandle(h) }
        let root = inodes[FuseProtocol.rootNodeID]
        inodes = [:]
        byKey = [:]
        handles = [:]
        if let root {
            inodes[FuseProtocol.rootNodeID] = root
            byKey[Key(device: root.device, inode: root.inode)] = FuseProtocol.rootNodeID
        }
    }

    func closeHandle(_ h: Handle) {
        if let fd = h.descriptor { close(fd) }
    }

    var inodeCount: Int { inodes.count }
    var handleCount: Int { handles.count }

    // MARK: names and inodes

    /// A name the driver sent: 1...255 bytes, no '/', not "." or ".." (R3). NUL cannot
    /// occur (names are cut at their terminator).
    static func check(_ name: [UInt8]) -> Int32? {
        if name.isEmpty { return EINVAL }
        if name.count > FuseProtocol.maximumNameLength { return ENAMETOOLONG }
        if name.contains(0x2f) || name == [0x2e] || name == [0x2e, 0x2e] { return EINVAL }
        return nil
    }

    func inode(_ node: UInt64) -> Result<Inode, FSErrno> {
        guard let i = inodes[node] else { return .failure(FSErrno(ESTALE)) }
        return .success(i)
    }

    func directory(_ node: UInt64) -> Result<Inode, FSErrno> {
        guard let i = inodes[node] else { return .failure(FSErrno(ESTALE)) }
        guard i.type == .directory else { return .failure(FSErrno(ENOTDIR)) }
        return .success(i)
    }

    static func attributes(_ st: stat) -> FuseAttr {
        var a = FuseAttr()
        a.ino = UInt64(st.st_ino)
        a.size = UInt64(max(0, st.st_size))
        a.blocks = UInt64(max(0, st.st_blocks))
        a.atime = UInt64(max(0, st.st_atim.tv_sec))
        a.mtime = UInt64(max(0, st.st_mtim.tv_sec))
        a.ctime = UInt64(max(0, st.st_ctim.tv_sec))
        a.atimeNanoseconds = UInt32(truncatingIfNeeded: st.st_atim.tv_nsec)
        a.mtimeNanoseconds = UInt32(truncatingIfNeeded: st.st_mtim.tv_nsec)
        a.ctimeNanoseconds = UInt32(truncatingIfNeeded: st.st_ctim.tv_nsec)
        a.mode = UInt32(st.st_mode)
        a.nlink = UInt32(truncatingIfNeeded: st.st_nlink)
        a.uid = st.st_uid
        a.gid = st.st_gid
        a.rdev = UInt32(truncatingIfNeeded: st.st_rdev)
        a.blockSize = UInt32(truncatingIfNeeded: st.st_blksize)
        return a
    }

    /// Adopts an O_PATH descriptor as an inode (one more lookup if we know it already).
    /// Closes `fd` when it is not kept.
    func adopt(_ fd: Int32) -> Result<FuseEntryOut, FSErrno> {
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            return .failure(FSErrno(e))
        }
        guard let type = FuseProtocol.FileType(mode: UInt32(st.st_mode)) else {
            close(fd)
            return .failure(FSErrno(EIO))
        }
        let key = Key(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        let node: UInt64
        if let known = byKey[key], var i = inodes[known] {
            close(fd)
            i.lookups &+= 1
            inodes[known] = i
            node = known
        } else {
            guard inodes.count < maximumInodes else {
                close(fd)
                return .failure(FSErrno(ENFILE))
            }
            node = nextNode
            nextNode += 1
            inodes[node] = Inode(descriptor: fd, type: type, device: key.device, inode: key.inode, lookups: 1)
            byKey[key] = node
        }
        var e = FuseEntryOut()
        e.nodeID = node
        e.attr = Self.attributes(st)
        return .success(e)
    }

    func lookup(parent: UInt64, name: [UInt8]) -> Result<FuseEntryOut, FSErrno> {
        if let e = Self.check(name) { return .failure(FSErrno(e)) }
        let dir: Inode
        switch directory(parent) {
        case .success(let d): dir = d
        case .failure(let e): return .failure(e)
        }
        let fd = withCString(name) {
            rf_openat2(dir.descriptor, $0, UInt64(RF_O_PATH | RF_O_NOFOLLOW | O_CLOEXEC), 0, Self.resolve)
        }
        guard fd >= 0 else { return .failure(FSErrno(errno)) }
        return adopt(fd)
    }

    /// Calls a system call with `name` as a C string (the array is never empty: it ends
    /// with the NUL added here).
    func withCString(_ name: [UInt8], _ body: (UnsafePointer<CChar>) -> Int32) -> Int32 {
        (name.map { CChar(bitPattern: $0) } + [0]).withUnsafeBufferPointer { b in
            guard let p = b.baseAddress else {
                errno = EINVAL
                return -1
            }
            return body(p)
        }
    }

    /// FORGET: drops `count` lookups; at zero the inode and its descriptor go. The root
    /// is never forgotten; unknown nodeids are ignored (FORGET has no reply).
    func forget(_ node: UInt64, count: UInt64) {
        guard node != FuseProtocol.rootNodeID, var i = inodes[node] else { return }
        if i.lookups > count {
            i.lookups -= count
            inodes[node] = i
            return
        }
        close(i.descriptor)
        inodes[node] = nil
        byKey[Key(device: i.device, inode: i.inode)] = nil
    }

    func getattr(_ node: UInt64) -> Result<FuseAttr, FSErrno> {
        let i: Inode
        switch inode(node) {
        case .success(let x): i = x
        case .failure(let e): return .failure(e)
        }
        var st = stat()
        let r = "".withCString { fstatat(i.descriptor, $0, &st, RF_AT_EMPTY_PATH | RF_AT_SYMLINK_NOFOLLOW) }
        guard r == 0 else { return .failure(FSErrno(errno)) }
        return .success(Self.attributes(st))
    }

    /// Reopens an inode's O_PATH descriptor with real access through /proc/self/fd (a
    /// regular file or directory only: never a symlink, device or FIFO).
    func reopen(_ i: Inode, flags: Int32) -> Result<Int32, FSErrno> {
        guard i.type == .regular || i.type == .directory else {
            return .failure(FSErrno(i.type == .symlink ? ELOOP : EACCES))
        }
        let fd = "\(i.descriptor)".withCString { openat(procDescriptor, $0, flags | O_CLOEXEC | O_NOCTTY) }
        guard fd >= 0 else { return .failure(FSErrno(errno)) }
        return .success(fd)
    }

    /// The open flags a driver may ask for: access mode, O_APPEND, O_TRUNC; nothing that
    /// changes how a name resolves or what kind of file is opened.
    static func sanitize(_ flags: UInt32) -> Int32 {
        let f = Int32(bitPattern: flags)
        return f & (O_ACCMODE | O_APPEND | O_TRUNC)
    }

    func writes(_ flags: Int32) -> Bool { flags & O_ACCMODE != O_RDONLY || flags & O_TRUNC != 0 }

    func addHandle(_ h: Handle) -> Result<UInt64, FSErrno> {
        guard handles.count < maximumHandles else {
            closeHandle(h)
            return .failure(FSErrno(ENFILE))
        }
        let fh = nextHandle
        nextHandle &+= 1
        handles[fh] = h
        return .success(fh)
    }

    func open(_ node: UInt64, flags: UInt32) -> Result<UInt64, FSErrno> {
        let i: Inode
        switch inode(node) {
        case .success(let x): i = x
        case .failure(let e): return .failure(e)
        }
        if i.type == .directory { return .failure(FSErrno(EISDIR)) }
        let f = Self.sanitize(flags)
        if readOnly && writes(f) { return .failure(FSErrno(EROFS)) }
        switch reopen(i, flags: f) {
        case .success(let fd): return addHandle(.file(descriptor: fd, node: node))
        case .failure(let e): return .failure(e)
        }
    }

    func openDirectory(_ node: UInt64) -> Result<UInt64, FSErrno> {
        let i: Inode
        switch directory(node) {
        case .success(let x): i = x
        case .failure(let e): return .failure(e)
        }
        let fd: Int32
        switch reopen(i, flags: O_RDONLY | RF_O_DIRECTORY) {
        case .success(let x): fd = x
        case .failure(let e): return .failure(e)
        }
        guard let dir = fdopendir(fd) else {
            let e = errno
            close(fd)
            return .failure(FSErrno(e))
        }
        defer { closedir(dir) }
        var names: [[UInt8]] = []
        // readdir's buffer is the C library's private memory, not shared memory.
        while names.count < maximumDirectoryEntries, let entry = readdir(dir) {
            // The name is read in place: copying the whole `d_name` array reads past the
            // end of the buffer when a short entry is the last in it.
            guard let p = rf_dirent_name(entry) else { continue }
            let name = Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
            if name == [0x2e] || name == [0x2e, 0x2e] { continue }
            names.append(name)
        }
        return addHandle(.directory(names: names, node: node))
    }

    func release(_ fh: UInt64) {
        guard let h = handles.removeValue(forKey: fh) else { return }
        closeHandle(h)
    }

    func fileDescriptor(_ fh: UInt64) -> Result<Int32, FSErrno> {
        guard let fd = handles[fh]?.descriptor else { return .failure(FSErrno(EBADF)) }
        return .success(fd)
    }

    func directoryNames(_ fh: UInt64) -> Result<(names: [[UInt8]], node: UInt64), FSErrno> {
        guard let h = handles[fh], let names = h.names else { return .failure(FSErrno(EBADF)) }
        return .success((names, h.node))
    }

    // MARK: changes

    func create(parent: UInt64, name: [UInt8], flags: UInt32, mode: UInt32, umask: UInt32)
        -> Result<(FuseEntryOut, UInt64), FSErrno>
    {
        if let e = Self.check(name) { return .failure(FSErrno(e)) }
        if readOnly { return .failure(FSErrno(EROFS)) }
        let dir: Inode
        switch directory(parent) {
        case .success(let d): dir = d
        case .failure(let e): return .failure(e)
        }
        let f = (Self.sanitize(flags) & ~O_TRUNC) | (Int32(bitPattern: flags) & O_EXCL) | O_CREAT | O_CLOEXEC
        let perm = mode & 0o7777 & ~umask
        let fd = withCString(name) {
            rf_openat2(dir.descriptor, $0, UInt64(UInt32(bitPattern: f)), UInt64(perm), Self.resolve)
        }
        guard fd >= 0 else { return .failure(FSErrno(errno)) }
        let path = "\(fd)".withCString { openat(procDescriptor, $0, RF_O_PATH | O_CLOEXEC) }
        guard path >= 0 else {
            let e = errno
            close(fd)
            return .failure(FSErrno(e))
        }
        let entry: FuseEntryOut
        switch adopt(path) {
        case .success(let x): entry = x
        case .failure(let e):
            close(fd)
            return .failure(e)
        }
        switch addHandle(.file(descriptor: fd, node: entry.nodeID)) {
        case .success(let fh): return .success((entry, fh))
        case .failure(let e):
            forget(entry.nodeID, count: 1)
            return .failure(e)
        }
    }

    func makeDirectory(parent: UInt64, name: [UInt8], mode: UInt32, umask: UInt32) -> Result<FuseEntryOut, FSErrno> {
        if let e = Self.check(name) { return .failure(FSErrno(e)) }
        if readOnly { return .failure(FSErrno(EROFS)) }
        switch directory(parent) {
        case .success(let d):
            guard withCString(name, { mkdirat(d.descriptor, $0, mode_t(mode & 0o7777 & ~umask)) }) == 0 else {
                return .failure(FSErrno(errno))
            }
            return lookup(parent: parent, name: name)
        case .failure(let e): return .failure(e)
        }
    }

    func symlink(parent: UInt64, name: [UInt8], target: [UInt8]) -> Result<FuseEntryOut, FSErrno> {
        if let e = Self.check(name) { return .failure(FSErrno(e)) }
        if readOnly { return .failure(FSErrno(EROFS)) }
        guard !target.isEmpty, target.count <= FuseProtocol.maximumLinkLength else {
            return .failure(FSErrno(target.isEmpty ? EINVAL : ENAMETOOLONG))
        }
        switch directory(parent) {
        case .success(let d):
            // The target is only stored, never followed by us.
            let r = withCString(target) { t in withCString(name) { n in symlinkat(t, d.descriptor, n) } }
            guard r == 0 else { return .failure(FSErrno(errno)) }
            return lookup(parent: parent, name: name)
        case .failure(let e): return .failure(e)
        }
    }

    func remove(parent: UInt64, name: [UInt8], directory isDirectory: Bool) -> FSErrno? {
        if let e = Self.check(name) { return FSErrno(e) }
        if readOnly { return FSErrno(EROFS) }
        switch directory(parent) {
        case .success(let d):
            let r = withCString(name) { unlinkat(d.descriptor, $0, isDirectory ? RF_AT_REMOVEDIR : 0) }
            return r == 0 ? nil : FSErrno(errno)
        case .failure(let e): return e
        }
    }

    func rename(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8], flags: UInt32) -> FSErrno? {
        if let e = Self.check(name) ?? Self.check(newName) { return FSErrno(e) }
        if readOnly { return FSErrno(EROFS) }
        guard flags & ~(RF_RENAME_NOREPLACE | RF_RENAME_EXCHANGE) == 0 else { return FSErrno(EINVAL) }
        let from: Inode
        let to: Inode
        switch directory(parent) {
        case .success(let d): from = d
        case .failure(let e): return e
        }
        switch directory(newParent) {
        case .success(let d): to = d
        case .failure(let e): return e
        }
        let r = withCString(name) { o in
            withCString(newName) { n in rf_renameat2(from.descriptor, o, to.descriptor, n, flags) }
        }
        return r == 0 ? nil : FSErrno(errno)
    }

    func readLink(_ node: UInt64) -> Result<[UInt8], FSErrno> {
        let i: Inode
        switch inode(node) {
        case .success(let x): i = x
        case .failure(let e): return .failure(e)
        }
        guard i.type == .symlink else { return .failure(FSErrno(EINVAL)) }
        var buffer = [CChar](repeating: 0, count: FuseProtocol.maximumLinkLength + 1)
        let n = buffer.withUnsafeMutableBufferPointer { b -> Int in
            guard let p = b.baseAddress else { return -1 }
            return "".withCString { readlinkat(i.descriptor, $0, p, b.count) }
        }
        guard n >= 0 else { return .failure(FSErrno(errno)) }
        return .success(buffer.prefix(min(n, FuseProtocol.maximumLinkLength)).map { UInt8(bitPattern: $0) })
    }

    /// SETATTR: size (through the handle or a reopened descriptor), mode, owner, times.
    func setattr(_ node: UInt64, _ s: SetattrIn) -> Result<FuseAttr, FSErrno> {
        typealias V = FuseProtocol.SetattrValid
        let i: Inode
        switch inode(node) {
        case .success(let x): i = x
        case .failure(let e): return .failure(e)
        }
        let changes = s.valid & (V.mode | V.uid | V.gid | V.size | V.atime | V.mtime)
        if readOnly && changes != 0 { return .failure(FSErrno(EROFS)) }
        let proc = "/proc/self/fd/\(i.descriptor)"
        if s.valid & V.mode != 0 {
            guard i.type != .symlink else { return .failure(FSErrno(EOPNOTSUPP)) }
            guard chmod(proc, mode_t(s.mode & 0o7777)) == 0 else { return .failure(FSErrno(errno)) }
        }
        if s.valid & (V.uid | V.gid) != 0 {
            let uid = s.valid & V.uid != 0 ? s.uid : UInt32.max
            let gid = s.valid & V.gid != 0 ? s.gid : UInt32.max
            let r = "".withCString { fchownat(i.descriptor, $0, uid, gid, RF_AT_EMPTY_PATH | RF_AT_SYMLINK_NOFOLLOW) }
            guard r == 0 else { return .failure(FSErrno(errno)) }
        }
        if s.valid & V.size != 0 {
            guard i.type == .regular else { return .failure(FSErrno(i.type == .directory ? EISDIR : EINVAL)) }
            guard s.size <= UInt64(Int64.max) else { return .failure(FSErrno(EFBIG)) }
            var fd: Int32 = -1
            var owned = false
            if s.valid & V.fh != 0, case .success(let h) = fileDescriptor(s.fh) {
                fd = h
            } else {
                switch reopen(i, flags: O_WRONLY) {
                case .success(let x):
                    fd = x
                    owned = true
                case .failure(let e): return .failure(e)
                }
            }
            let r = ftruncate(fd, off_t(s.size))
            let e = errno
            if owned { close(fd) }
            guard r == 0 else { return .failure(FSErrno(e)) }
        }
        if s.valid & (V.atime | V.mtime) != 0 && i.type != .symlink {
            var times = (timespec(tv_sec: 0, tv_nsec: utimeOmit), timespec(tv_sec: 0, tv_nsec: utimeOmit))
            if s.valid & V.atime != 0 {
                times.0 =
                    s.valid & V.atimeNow != 0
                    ? timespec(tv_sec: 0, tv_nsec: utimeNow)
                    : timespec(tv_sec: Int(clamping: s.atime), tv_nsec: Int(min(s.atimeNanoseconds, 999_999_999)))
            }
            if s.valid & V.mtime != 0 {
                times.1 =
                    s.valid & V.mtimeNow != 0
                    ? timespec(tv_sec: 0, tv_nsec: utimeNow)
                    : timespec(tv_sec: Int(clamping: s.mtime), tv_nsec: Int(min(s.mtimeNanoseconds, 999_999_999)))
            }
            let r = withUnsafePointer(to: &times) {
                $0.withMemoryRebound(to: timespec.self, capacity: 2) { utimensat(AT_FDCWD, proc, $0, 0) }
            }
            guard r == 0 else { return .failure(FSErrno(errno)) }
        }
        return getattr(node)
    }

    func statfs(_ node: UInt64) -> Result<FuseStatfs, FSErrno> {
        let i: Inode
        switch inode(node) {
        case .success(let x): i = x
        case .failure(let e): return .failure(e)
        }
        var v = statvfs()
        guard fstatvfs(i.descriptor, &v) == 0 else { return .failure(FSErrno(errno)) }
        var s = FuseStatfs()
        s.blocks = UInt64(v.f_blocks)
        s.freeBlocks = UInt64(v.f_bfree)
        s.availableBlocks = UInt64(v.f_bavail)
        s.files = UInt64(v.f_files)
        s.freeFiles = UInt64(v.f_ffree)
        s.blockSize = UInt32(truncatingIfNeeded: v.f_bsize)
        s.nameLength = UInt32(truncatingIfNeeded: v.f_namemax)
        s.fragmentSize = UInt32(truncatingIfNeeded: v.f_frsize)
        return .success(s)
    }
}

/// utimensat's special nanosecond values (<sys/stat.h>; not exported to Swift).
let utimeNow = (1 << 30) - 1
let utimeOmit = (1 << 30) - 2

/// An errno the device answers with.
struct FSErrno: Error, Equatable {
    let code: Int32
    init(_ code: Int32) { self.code = code > 0 && code < 4096 ? code : EIO }
}

/// `struct fuse_setattr_in`, parsed from the private copy of a request.
struct SetattrIn {
    var valid: UInt32 = 0
    var fh: UInt64 = 0
    var size: UInt64 = 0
    var atime: UInt64 = 0
    var mtime: UInt64 = 0
    var atimeNanoseconds: UInt32 = 0
    var mtimeNanoseconds: UInt32 = 0
    var mode: UInt32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0

    static let size = 88

    static func decode(_ r: inout FuseReader) -> SetattrIn? {
        guard r.remaining >= size else { return nil }
        var s = SetattrIn()
        s.valid = r.get() ?? 0
        _ = r.skip(4)
        s.fh = r.get() ?? 0
        s.size = r.get() ?? 0
        _ = r.skip(8)  // lock_owner
        s.atime = r.get() ?? 0
        s.mtime = r.get() ?? 0
        _ = r.skip(8)  // ctime
        s.atimeNanoseconds = r.get() ?? 0
        s.mtimeNanoseconds = r.get() ?? 0
        _ = r.skip(4)  // ctimensec
        s.mode = r.get() ?? 0
        _ = r.skip(4)
        s.uid = r.get() ?? 0
        s.gid = r.get() ?? 0
        _ = r.skip(4)
        return s
    }
}
