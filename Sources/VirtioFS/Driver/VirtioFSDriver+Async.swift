#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import Virtqueue
import VhostUser

/// The async engine's state on a driver: not started, running, or stopped by `close()`.
enum FSAsyncSlot {
    case none
    case running(IOEngine<FSExchangeTransport>)
    case closed
}

extension IOKind {
    /// A FUSE exchange rides on the engine's whole-buffer kind (one piece, never cut, the
    /// buffer zeroed first and handed back whole): the engine needs nothing FUSE-specific.
    static var exchange: IOKind { .identify }
}

/// How an exchange's engine buffer is laid out: an 8-byte header the transport fills on
/// completion (used length, a completed flag) and the caller's queue choice, then the
/// request, then the reply area.
enum FSExchangeLayout {
    static let header = 8
    /// Byte 4: 1 for the hiprio queue (FORGET, BATCH_FORGET: no reply area).
    static let hiprioByte = 4
    /// Byte 5: set to 1 when the device completed the request.
    static let completedByte = 5
}

// MARK: async calls (suspend; completions resume them from the driver's I/O thread)

/// The FUSE operations and path calls for async code. Each suspends the calling task
/// and never blocks a thread: the driver's I/O thread (started by the first async call)
/// posts the request on request queue 0 (the hiprio queue for forgets), waits for the
/// device and resumes the caller.
///
/// Cancellation: a cancelled task gets `CancellationError` at once. Its request, if the
/// device already has it, stays in flight with its bounce slice, its reply area and its
/// FUSE `unique` until the device answers it (the answer is dropped) or the driver
/// breaks (R5/R6; the slice then stays quarantined): a late answer never lands in memory
/// another request owns, and no other request ever carries that `unique`. A request
/// still queued when its task is cancelled is never posted. What a cancelled request
/// did on the device stays done (a cancelled WRITE may reach the file; a cancelled
/// LOOKUP's reference stays with the device until the connection ends). Cleanups the
/// path calls owe the device (RELEASE of a handle they opened, FORGET of what they
/// looked up) are posted even when the task was cancelled.
extension VirtioFSDriver {
    /// LOOKUP of `name` in directory `parent`, without blocking a thread. The entry
    /// carries one lookup reference: `forget` it when done.
    ///
    /// - Throws: `FSError` (as the synchronous call) or `CancellationError`.
    public func lookup(parent: UInt64, name: String) async throws -> FSEntry {
        try await perform(lookupRequest(parent: parent, name: name))
    }

    /// Drops `count` lookup references of `nodeID`. Never suspends: the FORGET (batched
    /// as `options.forgetBatch` says) is posted on the hiprio queue by the I/O thread,
    /// whatever becomes of the calling task.
    public func forget(_ nodeID: UInt64, count: UInt64 = 1) async throws {
        if let failure { throw failure }
        forgetInBackground(nodeID, count: count)
    }

    /// GETATTR of `nodeID` (through `handle` if given), without blocking a thread.
    public func getAttributes(_ nodeID: UInt64, handle: FSHandle? = nil) async throws -> FileAttributes {
        try await perform(getAttributesRequest(nodeID, handle: handle))
    }

    /// SETATTR without blocking a thread; returns the attributes after.
    public func setAttributes(_ nodeID: UInt64, _ changes: AttributeChanges, handle: FSHandle? = nil) async throws
        -> FileAttributes
    {
        try await perform(setAttributesRequest(nodeID, changes, handle: handle))
    }

    /// OPEN with `flags`, without blocking a thread.
    public func open(_ nodeID: UInt64, flags: Int32 = 0) async throws -> FSHandle {
        try await perform(openRequest(.open, nodeID: nodeID, flags: flags))
    }

    /// OPENDIR without blocking a thread.
    public func openDirectory(_ nodeID: UInt64) async throws -> FSHandle {
        try await perform(openRequest(.opendir, nodeID: nodeID, flags: O_RDONLY))
    }

    /// READ of at most `count` bytes (at most `info.maxRead`) at `offset`, without
    /// blocking a thread; fewer at the end of the file.
    public func read(_ handle: FSHandle, at offset: UInt64, count: Int) async throws -> [UInt8] {
        try await perform(readRequest(handle, at: offset, count: count))
    }

    /// WRITE of `bytes` (at most `info.maxWrite`, copied before the call suspends) at
    /// `offset`, without blocking a thread; returns the count written.
    public func write(_ handle: FSHandle, at offset: UInt64, bytes: [UInt8]) async throws -> Int {
        try await perform(writeRequest(handle, at: offset, count: bytes.count), data: bytes)
    }

    /// RELEASE without blocking a thread.
    public func release(_ handle: FSHandle) async throws {
        try await perform(releaseRequest(.release, handle))
    }

    /// RELEASEDIR without blocking a thread.
    public func releaseDirectory(_ handle: FSHandle) async throws {
        try await perform(releaseRequest(.releasedir, handle))
    }

    /// FLUSH without blocking a thread.
    public func flush(_ handle: FSHandle) async throws { try await perform(flushRequest(handle)) }

    /// FSYNC without blocking a thread.
    public func fsync(_ handle: FSHandle, dataOnly: Bool = false) async throws {
        try await perform(fsyncRequest(handle, dataOnly: dataOnly))
    }

    /// One READDIRPLUS without blocking a thread (as the synchronous call: `seen`
    /// carries the offsets so far, every entry holds a lookup reference, `next` nil at
    /// the end).
    public func readDirectoryPlus(_ handle: FSHandle, offset: UInt64, size: Int = 64 << 10, seen: inout Set<UInt64>)
        async throws -> (entries: [DirectoryEntry], next: UInt64?)
    {
        let body = try await perform(readDirectoryPlusRequest(handle, offset: offset, size: size))
        return try directoryPlusReply(body, seen: &seen)
    }

    /// CREATE without blocking a thread: a new regular file, opened with `flags`.
    public func create(parent: UInt64, name: String, permissions: UInt32 = 0o644, flags: Int32 = 2) async throws
        -> (FSEntry, FSHandle)
    {
        try await perform(createRequest(parent: parent, name: name, permissions: permissions, flags: flags))
    }

    /// MKDIR without blocking a thread.
    public func makeDirectory(parent: UInt64, name: String, permissions: UInt32 = 0o755) async throws -> FSEntry {
        try await perform(makeDirectoryRequest(parent: parent, name: name, permissions: permissions))
    }

    /// SYMLINK without blocking a thread.
    public func symlink(parent: UInt64, name: String, target: String) async throws -> FSEntry {
        try await perform(symlinkRequest(parent: parent, name: name, target: target))
    }

    /// UNLINK without blocking a thread.
    public func unlink(parent: UInt64, name: String) async throws {
        try await perform(nameRequest(.unlink, parent: parent, name: name))
    }

    /// RMDIR without blocking a thread.
    public func removeDirectory(parent: UInt64, name: String) async throws {
        try await perform(nameRequest(.rmdir, parent: parent, name: name))
    }

    /// RENAME2 without blocking a thread.
    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: UInt32 = 0)
        async throws
    {
        try await perform(
            renameRequest(parent: parent, name: name, newParent: newParent, newName: newName, flags: flags))
    }

    /// STATFS without blocking a thread.
    public func statistics() async throws -> FSStatistics { try await perform(statisticsRequest()) }

    /// READLINK without blocking a thread.
    public func readLink(_ nodeID: UInt64) async throws -> String { try await perform(readLinkRequest(nodeID)) }

    // MARK: path calls

    /// Runs `body` with the node of `path` (a lookup reference held meanwhile, forgotten
    /// after, also when the task is cancelled).
    public func withNode<T>(_ path: String, _ body: (FSEntry?) async throws -> T) async throws -> T {
        let parts = try Self.components(path)
        var held: [UInt64] = []
        defer {
            for n in held { forgetInBackground(n, count: 1) }
        }
        var current: FSEntry? = nil
        var parent = FuseProtocol.rootNodeID
        for p in parts {
            let e = try await lookup(parent: parent, name: p)
            held.append(e.nodeID)
            current = e
            parent = e.nodeID
        }
        return try await body(current)
    }

    /// The parent's nodeid and the last component of `path`, async.
    public func withParent<T>(_ path: String, _ body: (UInt64, String) async throws -> T) async throws -> T {
        var parts = try Self.components(path)
        guard let last = parts.popLast() else {
            throw FSError.invalidRequest("\(path.debugDescription) names the root")
        }
        return try await withNode(parts.joined(separator: "/")) { dir in
            try await body(dir?.nodeID ?? FuseProtocol.rootNodeID, last)
        }
    }

    /// The attributes of `path`, without blocking a thread.
    public func stat(_ path: String) async throws -> FileAttributes {
        try await withNode(path) { e in try await getAttributes(e?.nodeID ?? FuseProtocol.rootNodeID) }
    }

    /// Reads a whole file without blocking a thread.
    public func readFile(_ path: String) async throws -> [UInt8] {
        try await withNode(path) { e in
            let h = try await open(e?.nodeID ?? FuseProtocol.rootNodeID)
            defer { releaseInBackground(.release, h) }
            var out: [UInt8] = []
            while true {
                let chunk = try await read(h, at: UInt64(out.count), count: info.maxRead)
                if chunk.isEmpty { break }
                out += chunk
            }
            return out
        }
    }

    /// Creates or truncates `path` and writes `bytes` into it, without blocking a thread.
    public func writeFile(_ path: String, bytes: [UInt8], permissions: UInt32 = 0o644) async throws {
        try await withParent(path) { parent, name in
            let handle: FSHandle
            let created: UInt64
            do {
                let (entry, h) = try await create(parent: parent, name: name, permissions: permissions, flags: O_RDWR)
                (handle, created) = (h, entry.nodeID)
            } catch FSError.errno(EEXIST) {
                let e = try await lookup(parent: parent, name: name)
                created = e.nodeID
                do {
                    handle = try await open(e.nodeID, flags: O_RDWR | O_TRUNC)
                } catch {
                    forgetInBackground(created, count: 1)
                    throw error
                }
            }
            defer {
                releaseInBackground(.release, handle)
                forgetInBackground(created, count: 1)
            }
            var done = 0
            while done < bytes.count {
                let n = min(info.maxWrite, bytes.count - done)
                let wrote = try await write(handle, at: UInt64(done), bytes: Array(bytes[done..<done + n]))
                guard wrote > 0 else { throw FSError.errno(EIO) }
                done += wrote
            }
            try await flush(handle)
        }
    }

    /// The entries of a directory ("." and ".." left out), without blocking a thread.
    public func listDirectory(_ path: String) async throws -> [DirectoryEntry] {
        try await withNode(path) { e in
            let h = try await openDirectory(e?.nodeID ?? FuseProtocol.rootNodeID)
            defer { releaseInBackground(.releasedir, h) }
            var all: [DirectoryEntry] = []
            var seen = Set<UInt64>()
            var offset: UInt64 = 0
            while true {
                let (batch, next) = try await readDirectoryPlus(h, offset: offset, seen: &seen)
                for entry in batch { forgetInBackground(entry.entry.nodeID, count: 1) }
                all += batch
                guard let next else { break }
                offset = next
            }
            return all
        }
    }

    /// MKDIR of `path`, without blocking a thread.
    public func makeDirectory(_ path: String, permissions: UInt32 = 0o755) async throws {
        try await withParent(path) { parent, name in
            let e = try await makeDirectory(parent: parent, name: name, permissions: permissions)
            forgetInBackground(e.nodeID, count: 1)
        }
    }

    /// Removes a file, symlink or empty directory, without blocking a thread.
    public func remove(_ path: String) async throws {
        try await withParent(path) { parent, name in
            let e = try await lookup(parent: parent, name: name)
            defer { forgetInBackground(e.nodeID, count: 1) }
            if e.attributes.type == .directory {
                try await removeDirectory(parent: parent, name: name)
            } else {
                try await unlink(parent: parent, name: name)
            }
        }
    }

    /// Renames `from` to `to`, without blocking a thread.
    public func rename(_ from: String, to: String, flags: UInt32 = 0) async throws {
        try await withParent(from) { oldParent, oldName in
            let source = try await lookup(parent: oldParent, name: oldName)
            defer { forgetInBackground(source.nodeID, count: 1) }
            try await withParent(to) { newParent, newName in
                try await rename(parent: oldParent, name: oldName, newParent: newParent, newName: newName, flags: flags)
            }
        }
    }

    /// A symlink at `path` pointing at `target`, without blocking a thread.
    public func symlink(_ path: String, target: String) async throws {
        try await withParent(path) { parent, name in
            let e = try await symlink(parent: parent, name: name, target: target)
            forgetInBackground(e.nodeID, count: 1)
        }
    }

    /// The target of the symlink at `path`, without blocking a thread.
    public func readLink(_ path: String) async throws -> String {
        try await withNode(path) { e in
            guard let e else { throw FSError.invalidRequest("the root is not a symlink") }
            return try await readLink(e.nodeID)
        }
    }

    // MARK: the exchange

    /// Runs `request` on the I/O thread for an awaiting caller; `data` follows the
    /// arguments (WRITE). The answer is checked exactly as on the synchronous path.
    func perform<Value>(_ request: FSRequest<Value>, data: [UInt8]? = nil) async throws -> Value {
        if let failure { throw failure }
        let engine = try engine()
        let unique = nextUnique.add(2, ordering: .relaxed).newValue
        let readable = FuseProtocol.inHeaderSize + request.args.count + (data?.count ?? 0)
        let op = makeOperation(
            request.opcode, nodeID: request.nodeID, args: request.args, data: data, unique: unique,
            replyCapacity: FuseProtocol.outHeaderSize + request.replyLimit, hiprio: false, delivery: .caller)
        guard let result = await engine.perform(op) else { throw CancellationError() }
        let bytes: [UInt8]
        switch result {
        case .success(let b): bytes = b
        case .failure(let e):
            if e.violationCause != nil || e.rule != nil || isDisconnect(e) { fail(e) }
            throw e
        }
        let (used, reply) = Self.reply(in: bytes, readable: readable)
        let checked = try deviceCheck { () throws(FSViolation) in
            try FSReply.checkHeader(reply, usedLength: used, unique: unique)
        }
        if checked.error != 0 { throw FSError.errno(-checked.error) }
        return try request.parse(checked.body)
    }

    /// The used length and a copy of the reply out of an exchange's engine buffer.
    static func reply(in bytes: [UInt8], readable: Int) -> (UInt32, [UInt8]) {
        let used = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
        let start = FSExchangeLayout.header + readable
        return (used, Array(bytes[start..<min(bytes.count, start + Int(used))]))
    }

    /// An engine operation carrying one FUSE request: header (with `unique`, fresh from
    /// `nextUnique`: never given to another request), arguments, data, and `replyCapacity` bytes for
    /// the answer.
    func makeOperation(
        _ opcode: FuseProtocol.Opcode, nodeID: UInt64, args: [UInt8], data: [UInt8]?, unique: UInt64,
        replyCapacity: Int, hiprio: Bool, delivery: IODelivery<FSError>
    ) -> IOOperation<FSError> {
        let readable = FuseProtocol.inHeaderSize + args.count + (data?.count ?? 0)
        var w = FuseWriter(capacity: FSExchangeLayout.header + readable)
        w.zeros(FSExchangeLayout.header)
        FuseInHeader(
            length: UInt32(truncatingIfNeeded: readable), opcode: opcode.rawValue, unique: unique, nodeID: nodeID,
            uid: getuid(), gid: getgid()
        ).encode(into: &w)
        w.append(args)
        if let data { w.append(data) }
        var bytes = w.bytes
        if hiprio { bytes[FSExchangeLayout.hiprioByte] = 1 }
        let op = IOOperation<FSError>(
            kind: .exchange, offset: UInt64(readable), count: bytes.count + replyCapacity, delivery: delivery)
        op.fill(from: bytes)
        return op
    }

    /// Records a forget and, when a batch is due, posts it on the hiprio queue from the
    /// I/O thread, whatever becomes of the calling task.
    func forgetInBackground(_ nodeID: UInt64, count: UInt64) {
        guard noteForget(nodeID, count: count), failure == nil, let engine = try? engine(),
            let (opcode, node, args) = takeForgets()
        else { return }
        let op = makeOperation(
            opcode, nodeID: node, args: args, data: nil, unique: nextUnique.add(2, ordering: .relaxed).newValue,
            replyCapacity: 0, hiprio: true,
            delivery: .stream(tag: 0) { [weak self] c in
                // A request without reply: any used length is a violation (as `post`).
                guard case .success(let bytes) = c.result else { return }
                let used = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) }
                if used != 0 { self?.fail(.deviceViolation(.unexpectedReply(queue: 0, length: used))) }
            })
        _ = engine.enqueue(op)
    }

    /// Posts RELEASE / RELEASEDIR of a handle a path call opened, from the I/O thread,
    /// whatever becomes of the calling task (the answer is checked; an errno is ignored).
    func releaseInBackground(_ opcode: FuseProtocol.Opcode, _ handle: FSHandle) {
        guard failure == nil, let engine = try? engine() else { return }
        let request = releaseRequest(opcode, handle)
        let unique = nextUnique.add(2, ordering: .relaxed).newValue
        let readable = FuseProtocol.inHeaderSize + request.args.count
        let op = makeOperation(
            opcode, nodeID: request.nodeID, args: request.args, data: nil, unique: unique,
            replyCapacity: FuseProtocol.outHeaderSize, hiprio: false,
            delivery: .stream(tag: 0) { [weak self] c in
                guard let self, case .success(let bytes) = c.result else { return }
                let (used, reply) = Self.reply(in: bytes, readable: readable)
                _ = try? self.deviceCheck { () throws(FSViolation) in
                    let checked = try FSReply.checkHeader(reply, usedLength: used, unique: unique)
                    if checked.error == 0 { _ = try FSReply.exact(checked.body, 0, "RELEASE") }
                }
            })
        _ = engine.enqueue(op)
    }

    /// The running engine, started on first use.
    func engine() throws(FSError) -> IOEngine<FSExchangeTransport> {
        try asyncEngine.withLock { (slot: inout FSAsyncSlot) throws(FSError) -> IOEngine<FSExchangeTransport> in
            switch slot {
            case .running(let engine): return engine
            case .closed: throw FSError.disconnected("the file system is closed")
            case .none:
                let transport = FSExchangeTransport(
                    queues: [hiprio, queues[0]], region: region, control: control,
                    requestTimeout: options.requestTimeout
                ) { [weak self] error in self?.fail(error) }
                do throws(SystemError) {
                    let engine = try IOEngine(transport: transport, spinIterations: options.spinIterations)
                    slot = .running(engine)
                    return engine
                } catch {
                    throw FSError.system(error.description)
                }
            }
        }
    }

    /// `close()`: queued async calls fail as disconnected; those in flight finish or fail
    /// by their deadline, then the I/O thread ends.
    func stopAsyncEngine() {
        let engine = asyncEngine.withLock { slot -> IOEngine<FSExchangeTransport>? in
            defer { slot = .closed }
            if case .running(let engine) = slot { return engine }
            return nil
        }
        engine?.stop()
    }

    /// Operations the I/O thread still holds memory for (a cancelled caller's included);
    /// for the cancellation tests.
    var asyncHeld: Int {
        asyncEngine.withLock { slot in
            if case .running(let engine) = slot { return engine.held }
            return 0
        }
    }
}

/// The hiprio queue and request queue 0 as the async engine drives them: many requests
/// in flight at once (the synchronous path posts one per queue), matched to their
/// callers by ring token, each with its own bounce slice and deadline (R5).
final class FSExchangeTransport: IOTransport {
    struct InFlight {
        let queue: Int
        let slice: BounceSlice
        let readable: Int
        let buffer: UnsafeMutableRawBufferPointer
        let deadline: Deadline
    }

    /// [hiprio, request queue 0], each under its lock while the engine holds it.
    let locked: [Locked<FSQueue>]
    let queues: [FSQueue]
    /// Keeps the rings and bounce pools mapped while requests are in flight, even if the
    /// driver is gone.
    let region: SharedRegion
    let control: Int32
    let requestTimeout: Double
    let onBreak: (FSError) -> Void
    /// Exchanges are never cut.
    let maxPieceBytes = Int.max
    var inFlightRequests: [UInt64: InFlight] = [:]
    /// Requests handed back failed once the queues broke, and why.
    var failedTags: [UInt64] = []
    var failure: FSError?
    var backoff = WakeBackoff()
    var woke = false

    init(
        queues: [Locked<FSQueue>], region: SharedRegion, control: Int32, requestTimeout: Double,
        onBreak: @escaping (FSError) -> Void
    ) {
        self.locked = queues
        self.queues = queues.map { $0.withLock { $0 } }
        self.region = region
        self.control = control
        self.requestTimeout = requestTimeout
        self.onBreak = onBreak
    }

    func post(_ piece: IOPiece, tag: UInt64) throws(FSError) -> Bool {
        if let failure { throw failure }
        let index = piece.buffer[FSExchangeLayout.hiprioByte] == 1 ? 0 : 1
        let queue = queues[index]
        if queue.broken { throw FSError.disconnected("queue \(queue.index) is broken") }
        let readable = Int(piece.offset)
        let replyCapacity = piece.buffer.count - FSExchangeLayout.header - readable
        guard let slice = queue.pool.allocate(readable + replyCapacity) else { return false }
        queue.pool.copyIn(
            slice, at: 0,
            from: UnsafeRawBufferPointer(
                rebasing: piece.buffer[FSExchangeLayout.header..<FSExchangeLayout.header + readable]))
        var segments = [queue.pool.segment(slice, offset: 0, length: readable, deviceWritable: false)]
        if replyCapacity > 0 {
            segments.append(queue.pool.segment(slice, offset: readable, length: replyCapacity, deviceWritable: true))
        }
        do {
            _ = try queue.ring.add(segments, token: tag)
        } catch {
            queue.pool.free(slice)
            switch error {
            case .full: return false
            case .broken(let v):
                breakAll(.violation(v))
                throw FSError.violation(v)
            default: throw FSError.invalidRequest(error.description)
            }
        }
        inFlightRequests[tag] = InFlight(
            queue: index, slice: slice, readable: readable, buffer: piece.buffer,
            deadline: .after(seconds: requestTimeout))
        return true
    }

    func publish() {
        guard failure == nil else { return }
        for queue in queues where queue.ring.publish() && !queue.kick.signal() {
            breakAll(.violation(.notifierBlocked(role: "kick")))
            return
        }
    }

    func nextCompletion() -> (tag: UInt64, failure: FSError?)? {
        if let tag = failedTags.popLast() { return (tag, failure) }
        guard failure == nil else { return nil }
        for queue in queues {
            let completion: Completion?
            do {
                completion = try queue.ring.nextCompletion()
            } catch {
                breakAll(.violation(error))
                return failedTags.popLast().map { ($0, failure) }
            }
            guard let completion else { continue }
            if woke {
                backoff.note(productive: true)
                woke = false
            }
            guard let request = inFlightRequests.removeValue(forKey: completion.token) else { continue }
            // One copy of at most the used length (checked by the ring against what was
            // posted, R3) into the request's own engine buffer (R2).
            let start = FSExchangeLayout.header + request.readable
            _ = queue.pool.copyOut(
                request.slice, at: request.readable, validatedLength: Int(completion.length),
                to: UnsafeMutableRawBufferPointer(rebasing: request.buffer[start...]))
            queue.pool.free(request.slice)
            request.buffer.storeBytes(of: completion.length.littleEndian, as: UInt32.self)
            request.buffer[FSExchangeLayout.completedByte] = 1
            return (completion.token, nil)
        }
        if woke {
            // Woken without a completion: a storm is backed off (R5).
            woke = false
            backoff.note(productive: false)
            backoff.pause(until: earliestDeadline)
        }
        return nil
    }

    var earliestDeadline: Deadline {
        inFlightRequests.values.lazy.map(\.deadline).min() ?? .distantFuture
    }

    var inFlight: Int { inFlightRequests.count + failedTags.count }

    func waitForCompletion(orWake wake: Notifier) {
        guard failure == nil, failedTags.isEmpty, !inFlightRequests.isEmpty else { return }
        let deadline = earliestDeadline
        if deadline.hasPassed {
            breakAll(.timeout(milliseconds: UInt64(requestTimeout * 1000)))
            return
        }
        for queue in queues where queue.ring.enableInterrupts() {
            for q in queues { q.ring.disableInterrupts() }
            return
        }
        var fds = (
            pollfd(fd: control, events: Int16(POLLIN), revents: 0),
            pollfd(fd: wake.fileDescriptor, events: Int16(POLLIN), revents: 0),
            pollfd(fd: queues[0].call.fileDescriptor, events: Int16(POLLIN), revents: 0),
            pollfd(fd: queues[1].call.fileDescriptor, events: Int16(POLLIN), revents: 0)
        )
        var r: Int32
        repeat {
            r = withUnsafeMutableBytes(of: &fds) { raw in
                poll(raw.baseAddress?.assumingMemoryBound(to: pollfd.self), 4, deadline.pollTimeoutMilliseconds)
            }
        } while r < 0 && errno == EINTR
        for q in queues { q.ring.disableInterrupts() }
        guard r > 0 else { return }
        if fds.0.revents != 0 {
            switch UnixChannel.peerState(of: control) {
            case .quiet: break
            case .spoke:
                breakAll(.deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket")))
                return
            case .hungUp:
                breakAll(.disconnected("back-end closed the vhost-user socket"))
                return
            }
        }
        if fds.1.revents != 0 { wake.drain() }
        if fds.2.revents != 0 || fds.3.revents != 0 {
            var count: UInt64 = 0
            for q in queues { count &+= q.call.drain() }
            woke = count > 0
        }
    }

    /// Both queues fail closed (R6): every request in flight is handed back failed, and
    /// its slice stays quarantined (the device may still write it).
    func breakAll(_ error: FSError) {
        guard failure == nil else { return }
        failure = error
        for queue in queues where !queue.broken {
            queue.broken = true
            if case .violation(let v) = error {
                _ = queue.ring.breakQueue(v)
            } else {
                _ = queue.ring.breakQueue(.brokenAbove(rule: error.rule ?? .r6, reason: error.description))
            }
        }
        failedTags.append(contentsOf: inFlightRequests.keys)
        inFlightRequests.removeAll()
        onBreak(error)
    }

    func exclusively(_ body: () -> Void) {
        locked[0].withLock { _ in locked[1].withLock { _ in body() } }
    }

    var closedFailure: FSError { .disconnected("the file system is closed") }

    var noRoomFailure: FSError { .invalidRequest("request does not fit the bounce pool") }

    func engineStopped() {}
}
