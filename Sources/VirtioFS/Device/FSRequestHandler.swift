#if canImport(Glibc)
import Glibc
#endif
import CRingFence
public import SharedMemory
public import VhostUser
public import Virtqueue

/// Serves one virtio-fs queue (hiprio or a request queue) on that queue's thread.
///
/// A request is the readable part of a chain (`fuse_in_header`, arguments, WRITE data);
/// the reply goes into the writable part (`fuse_out_header` and body). The header and
/// arguments are copied once into private memory, their length bounded first; WRITE data
/// and READ data move between the file and guest memory directly. The used length is
/// exactly what the reply holds; a chain without room for a reply header, or a request
/// without reply (FORGET), completes with 0.
public final class FSRequestHandler: QueueHandler {
    public let device: VirtioFSDevice
    public let queueIndex: Int
    var chain = DescriptorChain()
    /// Requests served, and malformed chains seen.
    public private(set) var served = 0
    public private(set) var rejected = 0
    var rejectionLog = LogThrottle()
    /// The private copy of the current request (header and arguments), and the reply
    /// being built: both reused from request to request, so a GETATTR allocates nothing.
    var request: [UInt8] = []
    var out = FuseWriter(capacity: 4096)

    /// Largest header plus arguments copied for anything but WRITE (names, a symlink
    /// target, BATCH_FORGET's list).
    static let maximumArguments = 64 << 10

    init(device: VirtioFSDevice, queue: Int) {
        self.device = device
        self.queueIndex = queue
    }

    public func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        var count = 0
        while count < budget {
            switch try queue.nextChain(into: &chain, memory: memory) {
            case .empty:
                return count
            case .rejected(let head, let violation):
                rejected += 1
                device.counters.violation(violation.rule)
                if rejectionLog.admit() { device.onEvent(.requestRejected(queue: queueIndex, violation)) }
                queue.complete(head: head, length: 0)
            case .ready:
                queue.complete(head: chain.head, length: process())
            }
            served += 1
            count += 1
        }
        return count
    }

    /// Executes a chain the caller popped itself; returns the used length.
    public func execute(_ popped: DescriptorChain) -> UInt32 {
        chain = popped
        return process()
    }

    enum Outcome {
        /// No reply (FORGET, BATCH_FORGET, INTERRUPT).
        case none
        case error(Int32)
        case reply([UInt8])
        /// GETATTR, SETATTR: `fuse_attr_out` built straight into the reply.
        case attributes(FuseAttr)
        /// LOOKUP, MKDIR, SYMLINK: `fuse_entry_out` built straight into the reply.
        case entry(FuseEntryOut)
        /// READ: `count` data bytes already placed after the reply header.
        case data(Int)
    }

    func process() -> UInt32 {
        let readable = chain.readableLength
        guard readable >= UInt64(FuseProtocol.inHeaderSize) else {
            rejected += 1
            device.counters.violation(.r3)
            device.counters.request(.other, read: 0, written: 0, failed: true)
            return 0
        }
        // The header is fetched once into the private buffer; the arguments are appended
        // after it (never fetched twice), so the header parsed is the header checked.
        resizeRequest(FuseProtocol.inHeaderSize)
        request.withUnsafeMutableBytes { gather(chain.readable, at: 0, into: $0) }
        let decoded: FuseInHeader? = {
            var hr = FuseReader(request)
            return FuseInHeader.decode(&hr)
        }()
        guard let header = decoded else { return 0 }
        let outcome: Outcome
        written = 0
        if header.length < UInt32(FuseProtocol.inHeaderSize) || UInt64(header.length) > readable {
            device.counters.violation(.r3)
            outcome = .error(EINVAL)
        } else if header.opcode == FuseProtocol.Opcode.write.rawValue {
            outcome = write(header)
        } else if Int(header.length) > Self.maximumArguments {
            device.counters.violation(.r3)
            outcome = .error(EINVAL)
        } else {
            resizeRequest(Int(header.length))
            request.withUnsafeMutableBytes { all in
                let arguments = UnsafeMutableRawBufferPointer(rebasing: all[FuseProtocol.inHeaderSize...])
                gather(chain.readable, at: UInt64(FuseProtocol.inHeaderSize), into: arguments)
            }
            outcome = dispatch(header, FuseReader(request, offset: FuseProtocol.inHeaderSize))
        }
        let length = reply(outcome, unique: header.unique)
        device.counters.request(
            FSRequestClass(opcode: header.opcode), read: repliedData, written: written, failed: repliedError)
        return length
    }

    /// What the last reply held, for the counters: READ data bytes, and whether it was an error.
    var repliedData = 0
    var repliedError = false
    /// File bytes the last WRITE put into the file.
    var written = 0

    /// Sets the request buffer's length to `count` (zeros) without giving up its storage.
    func resizeRequest(_ count: Int) {
        if request.count > count {
            request.removeLast(request.count - count)
        } else if request.count < count {
            request.append(contentsOf: repeatElement(0, count: count - request.count))
        }
    }

    /// Writes the reply header (and a body) into the writable part; returns the used
    /// length: exactly the reply's.
    func reply(_ outcome: Outcome, unique: UInt64) -> UInt32 {
        let room = chain.writableLength
        var outcome = outcome
        var error: Int32 = 0
        var bodyCount = 0
        var dataCount = 0
        repliedData = 0
        repliedError = false
        switch outcome {
        case .none: return 0
        case .error(let e): error = -e
        case .reply(let b): bodyCount = b.count
        case .attributes: bodyCount = FuseProtocol.attrOutSize
        case .entry: bodyCount = FuseProtocol.entryOutSize
        case .data(let n): dataCount = n
        }
        guard room >= UInt64(FuseProtocol.outHeaderSize) else { return 0 }
        if UInt64(FuseProtocol.outHeaderSize + bodyCount + dataCount) > room {
            // The driver posted too little room for this reply: the error fits.
            outcome = .error(ERANGE)
            bodyCount = 0
            dataCount = 0
            error = -ERANGE
        }
        let length = FuseProtocol.outHeaderSize + bodyCount + dataCount
        repliedData = dataCount
        repliedError = error != 0
        // Built in the reused buffer: header, then the body encoded in place.
        out.removeAll()
        FuseOutHeader(length: UInt32(length), error: error, unique: unique).encode(into: &out)
        switch outcome {
        case .reply(let b): out.append(b)
        case .attributes(let a):
            out.zeros(16)  // attr_valid 0: the driver asks again (cache=none)
            a.encode(into: &out)
        case .entry(let e): e.encode(into: &out)
        case .none, .error, .data: break
        }
        scatter(out.bytes, at: 0)
        return UInt32(length)
    }

    // MARK: requests

    func dispatch(_ h: FuseInHeader, _ args: FuseReader) -> Outcome {
        var r = args
        typealias Op = FuseProtocol.Opcode
        guard let op = Op(rawValue: h.opcode) else { return .error(ENOSYS) }
        return device.state.withLock { s -> Outcome in
            if op == .initialize { return initialize(&r, &s) }
            guard s.initialized else { return .error(EIO) }
            let d = s.directory
            switch op {
            case .lookup:
                guard let name = r.cString(limit: 4096) else { return .error(EINVAL) }
                return entry(d.lookup(parent: h.nodeID, name: name))
            case .forget:
                if let n = r.get(UInt64.self) { d.forget(h.nodeID, count: n) }
                return .none
            case .batchForget:
                guard let count = r.get(UInt32.self), r.skip(4) else { return .none }
                // Bounded by the bytes present, whatever count claims.
                for _ in 0..<min(Int(count), r.remaining / 16) {
                    guard let node = r.get(UInt64.self), let n = r.get(UInt64.self) else { break }
                    d.forget(node, count: n)
                }
                return .none
            case .interrupt:
                return .none
            case .getattr:
                return attributes(d.getattr(h.nodeID))
            case .setattr:
                guard let s = SetattrIn.decode(&r) else { return .error(EINVAL) }
                return attributes(d.setattr(h.nodeID, s))
            case .open:
                guard let flags = r.get(UInt32.self) else { return .error(EINVAL) }
                return opened(d.open(h.nodeID, flags: flags))
            case .opendir:
                return opened(d.openDirectory(h.nodeID))
            case .release, .releasedir:
                guard let fh = r.get(UInt64.self) else { return .error(EINVAL) }
                d.release(fh)
                return .reply([])
            case .flush, .fsyncdir:
                return .reply([])
            case .fsync:
                guard let fh = r.get(UInt64.self), let flags = r.get(UInt32.self) else { return .error(EINVAL) }
                switch d.fileDescriptor(fh) {
                case .success(let fd):
                    let rc = flags & 1 != 0 ? fdatasync(fd) : fsync(fd)
                    return rc == 0 ? .reply([]) : .error(errno)
                case .failure(let e): return .error(e.code)
                }
            case .read:
                return read(&r, d)
            case .readdirplus, .readdir:
                return readDirectory(&r, d, plus: op == .readdirplus)
            case .create:
                guard let flags = r.get(UInt32.self), let mode = r.get(UInt32.self), let umask = r.get(UInt32.self),
                    r.skip(4), let name = r.cString(limit: 4096)
                else { return .error(EINVAL) }
                switch d.create(parent: h.nodeID, name: name, flags: flags, mode: mode, umask: umask) {
                case .success(let (e, fh)):
                    var w = FuseWriter(capacity: 144)
                    e.encode(into: &w)
                    w.put(fh)
                    w.put(UInt64(0))
                    return .reply(w.bytes)
                case .failure(let e): return .error(e.code)
                }
            case .mkdir:
                guard let mode = r.get(UInt32.self), let umask = r.get(UInt32.self), let name = r.cString(limit: 4096)
                else { return .error(EINVAL) }
                return entry(d.makeDirectory(parent: h.nodeID, name: name, mode: mode, umask: umask))
            case .symlink:
                guard let name = r.cString(limit: 4096), let target = r.cString(limit: 4096) else {
                    return .error(EINVAL)
                }
                return entry(d.symlink(parent: h.nodeID, name: name, target: target))
            case .unlink, .rmdir:
                guard let name = r.cString(limit: 4096) else { return .error(EINVAL) }
                return done(d.remove(parent: h.nodeID, name: name, directory: op == .rmdir))
            case .rename, .rename2:
                guard let newParent = r.get(UInt64.self) else { return .error(EINVAL) }
                var flags: UInt32 = 0
                if op == .rename2 {
                    guard let f = r.get(UInt32.self), r.skip(4) else { return .error(EINVAL) }
                    flags = f
                }
                guard let old = r.cString(limit: 4096), let new = r.cString(limit: 4096) else {
                    return .error(EINVAL)
                }
                return done(d.rename(parent: h.nodeID, name: old, newParent: newParent, newName: new, flags: flags))
            case .statfs:
                switch d.statfs(h.nodeID) {
                case .success(let st):
                    var w = FuseWriter(capacity: FuseProtocol.statfsOutSize)
                    st.encode(into: &w)
                    return .reply(w.bytes)
                case .failure(let e): return .error(e.code)
                }
            case .readlink:
                switch d.readLink(h.nodeID) {
                case .success(let t): return .reply(t)
                case .failure(let e): return .error(e.code)
                }
            case .destroy:
                return .reply([])
            default:
                return .error(ENOSYS)
            }
        }
    }

    func initialize(_ r: inout FuseReader, _ s: inout FSSession) -> Outcome {
        guard let major = r.get(UInt32.self), let minor = r.get(UInt32.self), let readahead = r.get(UInt32.self),
            let flags = r.get(UInt32.self)
        else { return .error(EINVAL) }
        guard major == FuseProtocol.majorVersion, minor >= FuseProtocol.minimumMinorVersion else {
            return .error(EPROTO)
        }
        typealias F = FuseProtocol.InitFlag
        var out = FuseInitOut()
        out.minor = min(minor, FuseProtocol.minorVersion)
        out.maxReadahead = readahead
        out.flags = flags & (F.asyncRead | F.bigWrites | F.doReaddirplus | F.maxPages | F.parallelDirops)
        out.maxBackground = 64
        out.congestionThreshold = 48
        out.maxWrite = UInt32(device.options.maximumTransfer)
        out.maxPages = UInt16(min(256, device.options.maximumTransfer / 4096))
        out.timeGranularity = 1
        s.initialized = true
        var w = FuseWriter(capacity: FuseProtocol.initOutSize)
        out.encode(into: &w)
        return .reply(w.bytes)
    }

    func entry(_ r: Result<FuseEntryOut, FSErrno>) -> Outcome {
        switch r {
        case .success(let e): return .entry(e)
        case .failure(let e): return .error(e.code)
        }
    }

    func attributes(_ r: Result<FuseAttr, FSErrno>) -> Outcome {
        switch r {
        case .success(let a): return .attributes(a)
        case .failure(let e): return .error(e.code)
        }
    }

    func opened(_ r: Result<UInt64, FSErrno>) -> Outcome {
        switch r {
        case .success(let fh):
            var w = FuseWriter(capacity: 16)
            w.put(fh)
            w.put(UInt64(0))
            return .reply(w.bytes)
        case .failure(let e): return .error(e.code)
        }
    }

    func done(_ e: FSErrno?) -> Outcome { e.map { .error($0.code) } ?? .reply([]) }

    /// READ: at most the size asked, the transfer limit and the room posted; the data
    /// goes straight from the file into the writable descriptors after the reply header.
    func read(_ r: inout FuseReader, _ d: HostDirectory) -> Outcome {
        guard let fh = r.get(UInt64.self), let offset = r.get(UInt64.self), let size = r.get(UInt32.self) else {
            return .error(EINVAL)
        }
        guard offset <= UInt64(Int64.max) else { return .error(EINVAL) }
        let fd: Int32
        switch d.fileDescriptor(fh) {
        case .success(let x): fd = x
        case .failure(let e): return .error(e.code)
        }
        let room = chain.writableLength - min(chain.writableLength, UInt64(FuseProtocol.outHeaderSize))
        let count = Int(min(UInt64(size), UInt64(device.options.maximumTransfer), room))
        var vectors: [iovec] = []
        forEachPiece(chain.writable, from: UInt64(FuseProtocol.outHeaderSize), count: UInt64(count)) { b, _ in
            vectors.append(iovec(iov_base: b.baseAddress, iov_len: b.count))
        }
        var done = 0
        while done < count {
            let n = preadv(fd, vectors, Int32(min(vectors.count, 1024)), off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n < 0 { return .error(errno) }
            if n == 0 { break }
            done += n
            dropFront(&vectors, n)
        }
        return .data(done)
    }

    /// WRITE: header and `fuse_write_in` copied privately; the data goes from the
    /// readable descriptors into the file directly (it is payload, never parsed).
    func write(_ h: FuseInHeader) -> Outcome {
        let headerEnd = FuseProtocol.inHeaderSize + 40
        guard Int(h.length) >= headerEnd else { return .error(EINVAL) }
        var args = [UInt8](repeating: 0, count: 40)
        args.withUnsafeMutableBytes { gather(chain.readable, at: UInt64(FuseProtocol.inHeaderSize), into: $0) }
        var r = FuseReader(args)
        guard let fh = r.get(UInt64.self), let offset = r.get(UInt64.self), let size = r.get(UInt32.self) else {
            return .error(EINVAL)
        }
        guard UInt64(headerEnd) + UInt64(size) <= UInt64(h.length), Int(size) <= device.options.maximumTransfer,
            offset <= UInt64(Int64.max) - UInt64(size)
        else {
            // More data claimed than carried, beyond the transfer limit, or past the largest offset.
            device.counters.violation(.r3)
            return .error(EINVAL)
        }
        return device.state.withLock { s -> Outcome in
            guard s.initialized else { return .error(EIO) }
            if s.directory.readOnly { return .error(EROFS) }
            let fd: Int32
            switch s.directory.fileDescriptor(fh) {
            case .success(let x): fd = x
            case .failure(let e): return .error(e.code)
            }
            var vectors: [iovec] = []
            forEachPiece(chain.readable, from: UInt64(headerEnd), count: UInt64(size)) { b, _ in
                vectors.append(iovec(iov_base: b.baseAddress, iov_len: b.count))
            }
            var done = 0
            while done < Int(size) {
                let n = pwritev(fd, vectors, Int32(min(vectors.count, 1024)), off_t(offset) + off_t(done))
                if n < 0 && errno == EINTR { continue }
                if n < 0 {
                    written = done
                    return done > 0 ? .reply(writeOut(done)) : .error(errno)
                }
                if n == 0 { break }
                done += n
                dropFront(&vectors, n)
            }
            written = done
            return .reply(writeOut(done))
        }
    }

    func writeOut(_ n: Int) -> [UInt8] {
        var w = FuseWriter(capacity: 8)
        w.put(UInt32(n))
        w.put(UInt32(0))
        return w.bytes
    }

    /// READDIRPLUS / READDIR from the OPENDIR snapshot: entry i has offset i + 1; as many
    /// as fit `size` (and the room posted). A READDIRPLUS entry is a lookup; one that does
    /// not fit is forgotten again.
    func readDirectory(_ r: inout FuseReader, _ d: HostDirectory, plus: Bool) -> Outcome {
        guard let fh = r.get(UInt64.self), let offset = r.get(UInt64.self), let size = r.get(UInt32.self) else {
            return .error(EINVAL)
        }
        let names: [[UInt8]]
        let node: UInt64
        switch d.directoryNames(fh) {
        case .success(let x): (names, node) = (x.names, x.node)
        case .failure(let e): return .error(e.code)
        }
        let room = chain.writableLength - min(chain.writableLength, UInt64(FuseProtocol.outHeaderSize))
        let limit = Int(min(UInt64(size), room, UInt64(device.options.maximumTransfer)))
        var w = FuseWriter(capacity: min(limit, 64 << 10))
        var index = Int(min(offset, UInt64(names.count)))
        while index < names.count {
            let name = names[index]
            let header = plus ? FuseProtocol.direntplusHeaderSize : FuseProtocol.direntHeaderSize
            let length = (header + name.count + 7) & ~7
            if w.count + length > limit { break }
            var record = FuseWriter(capacity: length)
            var type: UInt32 = 0
            var ino: UInt64 = 0
            if plus {
                switch d.lookup(parent: node, name: name) {
                case .success(let e):
                    e.encode(into: &record)
                    type = (FuseProtocol.FileType(mode: e.attr.mode)?.direntType) ?? 0
                    ino = e.attr.ino
                case .failure:
                    index += 1  // gone since OPENDIR
                    continue
                }
            } else {
                var st = stat()
                let dir = d.inodes[node]?.descriptor ?? -1
                let rc = d.withCString(name) { fstatat(dir, $0, &st, RF_AT_SYMLINK_NOFOLLOW) }
                if rc == 0 {
                    type = (FuseProtocol.FileType(mode: UInt32(st.st_mode))?.direntType) ?? 0
                    ino = UInt64(st.st_ino)
                }
            }
            record.put(ino)
            record.put(UInt64(index + 1))
            record.put(UInt32(name.count))
            record.put(type)
            record.append(name)
            record.align8()
            w.append(record.bytes)
            index += 1
        }
        return .reply(w.bytes)
    }

    // MARK: chain bytes

    func gather(_ segments: ArraySlice<ChainSegment>, at offset: UInt64, into: UnsafeMutableRawBufferPointer) {
        guard let destination = into.baseAddress else { return }
        forEachPiece(segments, from: offset, count: UInt64(into.count)) { buffer, at in
            if let source = buffer.baseAddress {
                SharedAccess.copy(from: source, to: destination + Int(at), count: buffer.count)
            }
        }
    }

    /// Writes private `bytes` into the writable part from `offset` (write-only, R1).
    func scatter(_ bytes: [UInt8], at offset: UInt64) {
        bytes.withUnsafeBytes { src in
            guard let base = src.baseAddress else { return }
            forEachPiece(chain.writable, from: offset, count: UInt64(src.count)) { buffer, at in
                if let dst = buffer.baseAddress { dst.copyMemory(from: base + Int(at), byteCount: buffer.count) }
            }
        }
    }

    /// Each piece of the bytes `[start, start + count)` of `segments` (clamped to them).
    func forEachPiece(
        _ segments: ArraySlice<ChainSegment>, from start: UInt64, count: UInt64,
        _ body: (UnsafeMutableRawBufferPointer, UInt64) -> Void
    ) {
        var skip = start
        var remaining = count
        var done: UInt64 = 0
        for segment in segments where remaining > 0 {
            let length = UInt64(segment.buffer.count)
            if skip >= length {
                skip -= length
                continue
            }
            let n = min(length - skip, remaining)
            body(UnsafeMutableRawBufferPointer(rebasing: segment.buffer[Int(skip)..<Int(skip + n)]), done)
            skip = 0
            remaining -= n
            done += n
        }
    }

    func dropFront(_ vectors: inout [iovec], _ n: Int) {
        var left = n
        while left > 0, let first = vectors.first {
            if first.iov_len <= left {
                left -= first.iov_len
                vectors.removeFirst()
            } else {
                vectors[0] = iovec(iov_base: first.iov_base.map { $0 + left }, iov_len: first.iov_len - left)
                left = 0
            }
        }
    }
}
