#if canImport(Glibc)
import Glibc
#endif

/// Path calls: each walks from the root with LOOKUP and forgets every reference it took
/// before returning. Paths are relative to the root ("a/b", "/a/b" alike); "." components
/// are skipped and ".." is refused (the walk never goes up).
extension VirtioFSDriver {
    static func components(_ path: String) throws(FSError) -> [String] {
        var parts: [String] = []
        for p in path.split(separator: "/", omittingEmptySubsequences: true) where p != "." {
            guard p != ".." else { throw .invalidRequest("'..' in \(path.debugDescription)") }
            parts.append(String(p))
        }
        return parts
    }

    /// Runs `body` with the nodeid of `path` (a lookup reference held meanwhile).
    public func withNode<T>(_ path: String, _ body: (FSEntry?) throws(FSError) -> T) throws(FSError) -> T {
        let parts = try Self.components(path)
        var held: [UInt64] = []
        defer {
            for n in held { try? forget(n) }
        }
        var current: FSEntry? = nil
        var parent = FuseProtocol.rootNodeID
        for p in parts {
            let e = try lookup(parent: parent, name: p)
            held.append(e.nodeID)
            current = e
            parent = e.nodeID
        }
        return try body(current)
    }

    /// The parent's nodeid and the last component of `path` (which must have one).
    public func withParent<T>(_ path: String, _ body: (UInt64, String) throws(FSError) -> T) throws(FSError) -> T {
        var parts = try Self.components(path)
        guard let last = parts.popLast() else { throw .invalidRequest("\(path.debugDescription) names the root") }
        return try withNode(parts.joined(separator: "/")) { (dir) throws(FSError) in
            try body(dir?.nodeID ?? FuseProtocol.rootNodeID, last)
        }
    }

    public func stat(_ path: String) throws(FSError) -> FileAttributes {
        try withNode(path) { (e) throws(FSError) in
            try getAttributes(e?.nodeID ?? FuseProtocol.rootNodeID)
        }
    }

    /// Reads a whole file (`progress` gets the bytes done so far).
    public func readFile(_ path: String, progress: ((Int) -> Void)? = nil) throws(FSError) -> [UInt8] {
        try withNode(path) { (e) throws(FSError) in
            let node = e?.nodeID ?? FuseProtocol.rootNodeID
            let h = try open(node)
            defer { try? release(h) }
            var out: [UInt8] = []
            while true {
                let chunk = try read(h, at: UInt64(out.count), count: info.maxRead)
                if chunk.isEmpty { break }
                out += chunk
                progress?(out.count)
            }
            return out
        }
    }

    /// Creates or truncates `path` and writes `bytes` into it.
    public func writeFile(_ path: String, bytes: [UInt8], permissions: UInt32 = 0o644, progress: ((Int) -> Void)? = nil)
        throws(FSError)
    {
        try withParent(path) { (parent, name) throws(FSError) in
            let handle: FSHandle
            var created: UInt64?
            do throws(FSError) {
                let (entry, h) = try create(parent: parent, name: name, permissions: permissions, flags: O_RDWR)
                handle = h
                created = entry.nodeID
            } catch .errno(EEXIST) {
                let e = try lookup(parent: parent, name: name)
                created = e.nodeID
                handle = try open(e.nodeID, flags: O_RDWR | O_TRUNC)
            }
            defer {
                try? release(handle)
                if let created { try? forget(created) }
            }
            var done = 0
            while done < bytes.count {
                let n = min(info.maxWrite, bytes.count - done)
                let wrote = try write(handle, at: UInt64(done), bytes: Array(bytes[done..<done + n]))
                guard wrote > 0 else { throw FSError.errno(EIO) }
                done += wrote
                progress?(done)
            }
            try flush(handle)
        }
    }

    /// The entries of a directory ("." and ".." left out), with their attributes.
    public func listDirectory(_ path: String) throws(FSError) -> [DirectoryEntry] {
        try withNode(path) { (e) throws(FSError) in
            let node = e?.nodeID ?? FuseProtocol.rootNodeID
            let h = try openDirectory(node)
            defer { try? releaseDirectory(h) }
            var all: [DirectoryEntry] = []
            var seen = Set<UInt64>()
            var offset: UInt64 = 0
            while true {
                let (batch, next) = try readDirectoryPlus(h, offset: offset, seen: &seen)
                for entry in batch { try forget(entry.entry.nodeID) }
                all += batch
                guard let next else { break }
                offset = next
            }
            return all
        }
    }

    public func makeDirectory(_ path: String, permissions: UInt32 = 0o755) throws(FSError) {
        try withParent(path) { (parent, name) throws(FSError) in
            let e = try makeDirectory(parent: parent, name: name, permissions: permissions)
            try forget(e.nodeID)
        }
    }

    /// Removes a file, symlink or empty directory.
    public func remove(_ path: String) throws(FSError) {
        try withParent(path) { (parent, name) throws(FSError) in
            // Held across the removal: virtiofsd (like the kernel) removes only what was
            // looked up.
            let e = try lookup(parent: parent, name: name)
            defer { try? forget(e.nodeID) }
            if e.attributes.type == .directory {
                try removeDirectory(parent: parent, name: name)
            } else {
                try unlink(parent: parent, name: name)
            }
        }
    }

    public func rename(_ from: String, to: String, flags: UInt32 = 0) throws(FSError) {
        try withParent(from) { (oldParent, oldName) throws(FSError) in
            let source = try lookup(parent: oldParent, name: oldName)
            defer { try? forget(source.nodeID) }
            try withParent(to) { (newParent, newName) throws(FSError) in
                try rename(parent: oldParent, name: oldName, newParent: newParent, newName: newName, flags: flags)
            }
        }
    }

    public func symlink(_ path: String, target: String) throws(FSError) {
        try withParent(path) { (parent, name) throws(FSError) in
            let e = try symlink(parent: parent, name: name, target: target)
            try forget(e.nodeID)
        }
    }

    public func readLink(_ path: String) throws(FSError) -> String {
        try withNode(path) { (e) throws(FSError) in
            guard let e else { throw FSError.invalidRequest("the root is not a symlink") }
            return try readLink(e.nodeID)
        }
    }
}
