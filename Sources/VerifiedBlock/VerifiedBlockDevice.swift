import SharedMemory

/// A block device that trusts no byte its transport returns (docs/verified-block.md):
/// each 4 KiB block is sealed with AES-256-GCM, bound to the device, its index and its
/// version; the versions are covered by a Merkle tree whose root lives in a local anchor
/// file. Any lie (flipped bits, another block, an old version, a rolled-back device, a
/// write not stored) is a `PayloadViolation`; the first one breaks the device (R6) and no
/// unverified byte reaches the caller.
///
/// One owner at a time (not thread-safe), like the transports below it.
public final class VerifiedBlockDevice {
    public struct Options: Sendable {
        /// Blocks per transport batch.
        public var maxBatch = 64
        /// Most blocks a device may have: the verified tree lives in memory (about 100
        /// bytes a block), so a back-end announcing an absurd capacity gets only this much
        /// of it used (format) or is refused (open). 1 << 22 blocks = 16 GiB.
        public var maxBlocks: UInt64 = 1 << 22
        public init() {}
    }

    /// Versions reserved in the anchor at a time (one synced anchor write per this many).
    static let reserveStep: UInt64 = 1 << 16
    static let zeroTag = [UInt8](repeating: 0, count: 16)

    public let transport: any BlockTransport
    public let layout: VerifiedLayout
    public let deviceID: [UInt8]
    public let options: Options
    let sealer: BlockSealer
    let anchor: AnchorFile
    var durable: AnchorState
    var versions: [UInt64]
    var slots: [UInt8]
    var tags: [UInt8]
    var tree: MerkleTree
    var nextVersion: UInt64
    var highestVersion: UInt64
    var pendingBlocks: Set<UInt64> = []
    let scratch: UnsafeMutableRawBufferPointer
    /// The first violation or transport failure; every later call throws it (R6).
    public private(set) var failure: VerifiedBlockError?

    /// Called once with the failure that broke the device.
    public var onFailure: ((VerifiedBlockError) -> Void)?

    public var blocks: UInt64 { layout.blocks }
    public var rootHash: [UInt8] { tree.root() }
    /// Blocks written since the last flush (old or new after a crash until the next one).
    public var pendingWrites: Int { pendingBlocks.count }
    public var isBroken: Bool { failure != nil }

    /// Where the time of reads and writes went (four clock reads per batch): the layer's
    /// own work (AEAD, tree) apart from the transport's.
    public struct Timing: Sendable, Equatable {
        public var blocks: UInt64 = 0
        public var cryptoNanoseconds: UInt64 = 0
        public var transferNanoseconds: UInt64 = 0
        public var treeNanoseconds: UInt64 = 0
    }
    public private(set) var readTiming = Timing()
    public private(set) var writeTiming = Timing()

    private init(
        transport: any BlockTransport, layout: VerifiedLayout, sealer: BlockSealer, anchor: AnchorFile,
        durable: AnchorState, versions: [UInt64], slots: [UInt8], tags: [UInt8], options: Options
    ) {
        self.transport = transport
        self.layout = layout
        self.deviceID = durable.deviceID
        self.sealer = sealer
        self.anchor = anchor
        self.durable = durable
        self.versions = versions
        self.slots = slots
        self.tags = tags
        self.options = options
        var leaves: [[UInt8]] = []
        leaves.reserveCapacity(versions.count)
        for i in 0..<versions.count {
            leaves.append(
                MerkleTree.leaf(
                    block: UInt64(i), version: versions[i], slot: Int(slots[i]), tag: tags.slice(16 * i, 16)))
        }
        tree = MerkleTree(leaves: leaves)
        nextVersion = durable.reservedVersion
        highestVersion = versions.max() ?? 0
        scratch = .allocate(byteCount: max(1, options.maxBatch) * VerifiedLayout.slotSize, alignment: 4096)
        scratch.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit { scratch.deallocate() }

    // MARK: format and open

    /// Formats `transport` as a new verified device (a fresh random identity) and writes
    /// its anchor. Nothing is zeroed: records of any other identity do not count.
    public static func format(
        transport: any BlockTransport, key: [UInt8], anchorPath: String, options: Options = Options()
    ) throws(VerifiedBlockError) -> VerifiedBlockDevice {
        guard key.count == 32 else { throw .local("the key must be 32 bytes, got \(key.count)") }
        guard let fits = VerifiedLayout(capacity: transport.capacityBytes) else {
            throw .invalidRequest("a \(transport.capacityBytes)-byte disk holds no verified block")
        }
        let layout = VerifiedLayout(blocks: min(fits.blocks, max(1, options.maxBlocks)))
        var rng = SystemRandomNumberGenerator()
        let id = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var sb = Superblock(deviceID: id, blocks: layout.blocks).encode()
        let written: Result<Void, TransportError> = sb.withUnsafeMutableBytes { buffer in
            do throws(TransportError) {
                try transport.transfer([TransportRequest(offset: 0, buffer: buffer, write: true)])
                try transport.flushWrites()
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = written { throw .transport(e) }
        var leaves: [[UInt8]] = []
        for i in 0..<layout.blocks { leaves.append(MerkleTree.leaf(block: i, version: 0, slot: 0, tag: zeroTag)) }
        var empty = MerkleTree(leaves: leaves)
        let state = AnchorState(
            deviceID: id, blocks: layout.blocks, root: empty.root(), committedVersion: 0,
            reservedVersion: 1, flushVersion: 1)
        _ = try AnchorFile.create(path: anchorPath, state: state)
        return try open(transport: transport, key: key, anchorPath: anchorPath, options: options)
    }

    /// Opens a formatted device: checks the superblock against the anchor, reads every
    /// slot record, checks the tree of the flushed versions (below `flushVersion`) against
    /// the anchored root, resolves the writes since that flush (each block to its old or
    /// its new content) and commits.
    public static func open(
        transport: any BlockTransport, key: [UInt8], anchorPath: String, options: Options = Options()
    ) throws(VerifiedBlockError) -> VerifiedBlockDevice {
        guard key.count == 32 else { throw .local("the key must be 32 bytes, got \(key.count)") }
        let (anchor, state) = try AnchorFile.load(path: anchorPath)
        guard state.blocks <= max(1, options.maxBlocks) else {
            throw .local("the anchor names \(state.blocks) blocks, more than maxBlocks \(options.maxBlocks)")
        }
        guard state.deviceID.count == 16, state.blocks >= 1,
            let fits = VerifiedLayout(capacity: transport.capacityBytes),
            fits.blocks >= state.blocks
        else {
            throw .violation(
                .deviceMismatch(
                    "the disk of \(transport.capacityBytes) bytes cannot hold the anchored \(state.blocks) blocks"))
        }
        let layout = VerifiedLayout(blocks: state.blocks)
        let sealer = BlockSealer(keyMaterial: key, deviceID: state.deviceID)
        let sb = try readRaw(transport, offset: 0, count: VerifiedLayout.superblockSize)
        guard let superblock = Superblock.decode(sb) else {
            throw .violation(.deviceMismatch("no verified-block superblock"))
        }
        guard superblock.deviceID == state.deviceID, superblock.blocks == state.blocks else {
            throw .violation(
                .deviceMismatch(
                    "superblock names device \(hexString(superblock.deviceID)) of \(superblock.blocks) blocks"))
        }
        let records = try readRecords(transport, layout: layout, deviceID: state.deviceID)
        let n = Int(state.blocks)
        var versions = [UInt64](repeating: 0, count: n)
        var slots = [UInt8](repeating: 0, count: n)
        var tags = [UInt8](repeating: 0, count: 16 * n)
        var candidates: [UInt64: (slot: Int, record: SlotRecord)] = [:]
        for b in 0..<n {
            var best: (Int, SlotRecord)?
            for s in 0..<2 {
                guard let r = records[2 * b + s], r.block == UInt64(b), r.version > 0,
                    r.version < state.reservedVersion
                else { continue }
                if r.version >= state.flushVersion {
                    // Written after the last flush: new if it authenticates (`recover`).
                    if r.version > candidates[UInt64(b)]?.record.version ?? 0 { candidates[UInt64(b)] = (s, r) }
                    continue
                }
                if best == nil || r.version > best?.1.version ?? 0 { best = (s, r) }
            }
            if let (s, r) = best {
                versions[b] = r.version
                slots[b] = UInt8(s)
                tags.put(r.tag, at: 16 * b)
            }
        }
        var leaves: [[UInt8]] = []
        leaves.reserveCapacity(n)
        for b in 0..<n {
            leaves.append(
                MerkleTree.leaf(
                    block: UInt64(b), version: versions[b], slot: Int(slots[b]), tag: tags.slice(16 * b, 16)))
        }
        var flushed = MerkleTree(leaves: leaves)
        guard flushed.root() == state.root else {
            let seen = versions.max() ?? 0
            if seen < state.committedVersion {
                throw .violation(.rolledBackRoot(anchoredVersion: state.committedVersion, deviceVersion: seen))
            }
            throw .violation(.rootMismatch)
        }
        let device = VerifiedBlockDevice(
            transport: transport, layout: layout, sealer: sealer, anchor: anchor, durable: state, versions: versions,
            slots: slots, tags: tags, options: options)
        if !candidates.isEmpty { try device.recover(candidates: candidates) }
        return device
    }

    /// Each block written after the last flush becomes new if its slot authenticates, else
    /// old; the record of a write that did not land whole is erased, so that the next open
    /// (whose flush version is then above it) cannot take it for the flushed content.
    func recover(candidates: [UInt64: (slot: Int, record: SlotRecord)]) throws(VerifiedBlockError) {
        var erase: [UInt64] = []
        for (block, c) in candidates.sorted(by: { $0.key < $1.key }) {
            let raw = try Self.readRaw(
                transport, offset: layout.slotOffset(block: block, slot: c.slot), count: VerifiedLayout.blockSize)
            let ok = raw.withUnsafeBytes { sealed in
                sealer.open(
                    sealed, tag: c.record.tag, block: block, version: c.record.version,
                    into: UnsafeMutableRawBufferPointer(rebasing: scratch[0..<VerifiedLayout.blockSize]))
            }
            if ok {
                apply(block: block, version: c.record.version, slot: c.slot, tag: c.record.tag)
            } else {
                erase.append(layout.recordOffset(block: block, slot: c.slot))
            }
        }
        if !erase.isEmpty {
            var zero = [UInt8](repeating: 0, count: VerifiedLayout.recordSize * erase.count)
            let r: Result<Void, TransportError> = zero.withUnsafeMutableBytes { z in
                let requests = erase.enumerated().map { i, off in
                    TransportRequest(
                        offset: off,
                        buffer: UnsafeMutableRawBufferPointer(
                            rebasing: z[(i * VerifiedLayout.recordSize)..<((i + 1) * VerifiedLayout.recordSize)]),
                        write: true)
                }
                do throws(TransportError) {
                    try transport.transfer(requests)
                    return .success(())
                } catch { return .failure(error) }
            }
            if case .failure(let e) = r { throw fail(.transport(e)) }
        }
        try flush()
    }

    // MARK: reads

    /// Reads whole blocks from `block` into `buffer` (a multiple of 4096 bytes). On any
    /// failure `buffer` is zeroed: nothing unverified, nothing partial.
    public func read(block first: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VerifiedBlockError) {
        do throws(VerifiedBlockError) {
            let count = try checkRange(first, buffer.count)
            var k = 0
            while k < count {
                let n = min(options.maxBatch, count - k)
                try readChunk(
                    (0..<UInt64(n)).map { first + UInt64(k) + $0 },
                    UnsafeMutableRawBufferPointer(
                        rebasing: buffer[(k * VerifiedLayout.blockSize)..<((k + n) * VerifiedLayout.blockSize)]))
                k += n
            }
        } catch {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            throw error
        }
    }

    public func read(block: UInt64, count: Int) throws(VerifiedBlockError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: max(0, count) * VerifiedLayout.blockSize)
        let r: Result<Void, VerifiedBlockError> = out.withUnsafeMutableBytes { b in
            do throws(VerifiedBlockError) {
                try read(block: block, into: b)
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw e }
        return out
    }

    /// Reads the blocks `list` (any order, any blocks) into consecutive 4 KiB pieces of
    /// `buffer`: the random-access form, up to `options.maxBatch` in flight at once.
    public func read(blocks list: [UInt64], into buffer: UnsafeMutableRawBufferPointer) throws(VerifiedBlockError) {
        do throws(VerifiedBlockError) {
            guard buffer.count == list.count * VerifiedLayout.blockSize, !list.isEmpty else {
                throw .invalidRequest("\(list.count) blocks need \(list.count * VerifiedLayout.blockSize) bytes")
            }
            for b in list where b >= blocks { throw .invalidRequest("block \(b) is beyond the \(blocks) blocks") }
            var k = 0
            while k < list.count {
                let n = min(options.maxBatch, list.count - k)
                try readChunk(
                    Array(list[k..<k + n]),
                    UnsafeMutableRawBufferPointer(
                        rebasing: buffer[(k * VerifiedLayout.blockSize)..<((k + n) * VerifiedLayout.blockSize)]))
                k += n
            }
        } catch {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            throw error
        }
    }

    func readChunk(_ list: [UInt64], _ out: UnsafeMutableRawBufferPointer) throws(VerifiedBlockError) {
        if let failure { throw failure }
        let n = list.count
        var requests: [TransportRequest] = []
        requests.reserveCapacity(n)
        for j in 0..<n {
            let b = Int(list[j])
            if versions[b] == 0 { continue }
            // The data only: the tag and version are in private memory. The record is
            // fetched only to name a lie (below).
            requests.append(
                TransportRequest(
                    offset: layout.slotOffset(block: UInt64(b), slot: Int(slots[b])),
                    buffer: UnsafeMutableRawBufferPointer(rebasing: slotScratch(j)[0..<VerifiedLayout.blockSize]),
                    write: false))
        }
        let t0 = monotonicNanoseconds()
        if !requests.isEmpty {
            do { try transport.transfer(requests) } catch { throw fail(.transport(error)) }
        }
        let t1 = monotonicNanoseconds()
        defer {
            readTiming.blocks &+= UInt64(n)
            readTiming.transferNanoseconds &+= t1 &- t0
            readTiming.cryptoNanoseconds &+= monotonicNanoseconds() &- t1
        }
        var failed: [Int] = []
        for j in 0..<n {
            let b = Int(list[j])
            let dest = UnsafeMutableRawBufferPointer(
                rebasing: out[(j * VerifiedLayout.blockSize)..<((j + 1) * VerifiedLayout.blockSize)])
            if versions[b] == 0 {
                dest.initializeMemory(as: UInt8.self, repeating: 0)
                continue
            }
            let data = UnsafeRawBufferPointer(rebasing: slotScratch(j)[0..<VerifiedLayout.blockSize])
            if !sealer.open(data, tag: tags.slice(16 * b, 16), block: UInt64(b), version: versions[b], into: dest) {
                dest.initializeMemory(as: UInt8.self, repeating: 0)
                failed.append(j)
            }
        }
        guard !failed.isEmpty else { return }
        // Detected. Read the failed slots whole (data and record) to name the lie.
        let whole = failed.map { j in
            TransportRequest(
                offset: layout.slotOffset(block: list[j], slot: Int(slots[Int(list[j])])), buffer: slotScratch(j),
                write: false)
        }
        do { try transport.transfer(whole) } catch { throw fail(.transport(error)) }
        let failures = failed.map { j in (j, name(block: list[j], slot: UnsafeRawBufferPointer(slotScratch(j)))) }
        guard let (firstFailed, firstViolation) = failures.first else { return }
        throw fail(.violation(tornOrFirst(list, failures, firstFailed, firstViolation)))
    }

    /// Several blocks of one multi-block write (consecutive versions) of which some are
    /// current and others missing or stale: the back-end stored only part of that write.
    func tornOrFirst(
        _ list: [UInt64], _ failures: [(Int, PayloadViolation)], _ firstFailed: Int, _ v: PayloadViolation
    ) -> PayloadViolation {
        let n = list.count
        guard n > 1, failures.count < n else { return v }
        let first = list[0]
        let base = versions[Int(first)]
        guard base > 0 else { return v }
        for j in 0..<n where list[j] != first &+ UInt64(j) || versions[Int(list[j])] != base &+ UInt64(j) { return v }
        for (_, f) in failures {
            switch f {
            case .staleVersion, .writeNotStored: continue
            default: return v
            }
        }
        return .tornWrite(firstBlock: first, blocks: n, missing: list[firstFailed])
    }

    /// Names the lie of a block whose data did not authenticate, from the slot's record as
    /// the back-end returns it on a second read (untrusted: only the name depends on it).
    func name(block b: UInt64, slot: UnsafeRawBufferPointer) -> PayloadViolation {
        let i = Int(b)
        let record = SlotRecord.decode(
            Array(slot[VerifiedLayout.blockSize..<VerifiedLayout.slotSize]), deviceID: deviceID)
        guard let record else { return .writeNotStored(block: b, version: versions[i]) }
        if record.block != b { return .wrongBlock(block: b, got: record.block) }
        if record.version < versions[i] {
            return .staleVersion(block: b, expected: versions[i], got: record.version)
        }
        return .tagMismatch(block: b)
    }

    // MARK: writes

    /// Writes whole blocks from `block`. Acknowledged writes are verified on every later
    /// read and durable (as old-or-new at a crash) once `flush()` returns.
    public func write(block first: UInt64, from data: UnsafeRawBufferPointer) throws(VerifiedBlockError) {
        let count = try checkRange(first, data.count)
        var k = 0
        while k < count {
            let n = min(options.maxBatch, count - k)
            try writeChunk(
                (0..<UInt64(n)).map { first + UInt64(k) + $0 },
                UnsafeRawBufferPointer(
                    rebasing: data[(k * VerifiedLayout.blockSize)..<((k + n) * VerifiedLayout.blockSize)]))
            k += n
        }
    }

    public func write(block: UInt64, bytes: [UInt8]) throws(VerifiedBlockError) {
        let r: Result<Void, VerifiedBlockError> = bytes.withUnsafeBytes { b in
            do throws(VerifiedBlockError) {
                try write(block: block, from: b)
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw e }
    }

    /// Writes consecutive 4 KiB pieces of `data` to the blocks `list` (distinct, any order):
    /// the random-access form, up to `options.maxBatch` in flight at once.
    public func write(blocks list: [UInt64], from data: UnsafeRawBufferPointer) throws(VerifiedBlockError) {
        guard data.count == list.count * VerifiedLayout.blockSize, !list.isEmpty else {
            throw .invalidRequest("\(list.count) blocks need \(list.count * VerifiedLayout.blockSize) bytes")
        }
        guard Set(list).count == list.count else { throw .invalidRequest("a block appears twice in one write") }
        for b in list where b >= blocks { throw .invalidRequest("block \(b) is beyond the \(blocks) blocks") }
        var k = 0
        while k < list.count {
            let n = min(options.maxBatch, list.count - k)
            try writeChunk(
                Array(list[k..<k + n]),
                UnsafeRawBufferPointer(
                    rebasing: data[(k * VerifiedLayout.blockSize)..<((k + n) * VerifiedLayout.blockSize)]))
            k += n
        }
    }

    func writeChunk(_ list: [UInt64], _ data: UnsafeRawBufferPointer) throws(VerifiedBlockError) {
        if let failure { throw failure }
        let n = list.count
        let v0 = nextVersion
        nextVersion += UInt64(n)
        if nextVersion > durable.reservedVersion {
            // No version of the new step is used before the reservation is on stable storage.
            durable.reservedVersion = nextVersion + Self.reserveStep
            do { try anchor.store(durable, sync: true) } catch { throw fail(error) }
        }
        let t0 = monotonicNanoseconds()
        var requests: [TransportRequest] = []
        var sealedTags: [[UInt8]] = []
        var targets: [Int] = []
        for j in 0..<n {
            let b = list[j]
            // Never over the slot the anchored root holds: a block written again before a
            // flush goes back to its unflushed slot.
            let live = Int(slots[Int(b)])
            let target = pendingBlocks.contains(b) ? live : (versions[Int(b)] == 0 ? 0 : 1 - live)
            let slot = slotScratch(j)
            guard
                let tag = sealer.seal(
                    UnsafeRawBufferPointer(
                        rebasing: data[(j * VerifiedLayout.blockSize)..<((j + 1) * VerifiedLayout.blockSize)]),
                    block: b, version: v0 + UInt64(j),
                    into: UnsafeMutableRawBufferPointer(rebasing: slot[0..<VerifiedLayout.blockSize]))
            else { throw fail(.local("AES-GCM seal failed")) }
            let record = SlotRecord(block: b, version: v0 + UInt64(j), tag: tag).encode(deviceID: deviceID)
            record.withUnsafeBytes {
                UnsafeMutableRawBufferPointer(rebasing: slot[VerifiedLayout.blockSize..<VerifiedLayout.slotSize])
                    .copyMemory(from: $0)
            }
            requests.append(
                TransportRequest(offset: layout.slotOffset(block: b, slot: target), buffer: slot, write: true))
            sealedTags.append(tag)
            targets.append(target)
            pendingBlocks.insert(b)
        }
        let t1 = monotonicNanoseconds()
        do { try transport.transfer(requests) } catch { throw fail(.transport(error)) }
        let t2 = monotonicNanoseconds()
        for j in 0..<n {
            apply(block: list[j], version: v0 + UInt64(j), slot: targets[j], tag: sealedTags[j])
        }
        writeTiming.blocks &+= UInt64(n)
        writeTiming.cryptoNanoseconds &+= t1 &- t0
        writeTiming.transferNanoseconds &+= t2 &- t1
        writeTiming.treeNanoseconds &+= monotonicNanoseconds() &- t2
    }

    func apply(block b: UInt64, version: UInt64, slot: Int, tag: [UInt8]) {
        let i = Int(b)
        versions[i] = version
        slots[i] = UInt8(slot)
        tags.put(tag, at: 16 * i)
        tree.update(i, leaf: MerkleTree.leaf(block: b, version: version, slot: slot, tag: tag))
        highestVersion = max(highestVersion, version)
    }

    /// Makes every acknowledged write durable: the back-end flushes, then the anchor takes
    /// the new root, and versions from here on count as written after this flush.
    public func flush() throws(VerifiedBlockError) {
        if let failure { throw failure }
        do { try transport.flushWrites() } catch { throw fail(.transport(error)) }
        durable.root = tree.root()
        durable.committedVersion = highestVersion
        durable.flushVersion = nextVersion
        do { try anchor.store(durable, sync: true) } catch { throw fail(error) }
        pendingBlocks = []
    }

    /// Flushes what was written since the last flush (if the device is healthy).
    public func close() {
        if failure == nil && !pendingBlocks.isEmpty { try? flush() }
    }

    // MARK: helpers

    func slotScratch(_ j: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(
            rebasing: scratch[(j * VerifiedLayout.slotSize)..<((j + 1) * VerifiedLayout.slotSize)])
    }

    func checkRange(_ first: UInt64, _ bytes: Int) throws(VerifiedBlockError) -> Int {
        guard bytes > 0, bytes % VerifiedLayout.blockSize == 0 else {
            throw .invalidRequest("\(bytes) bytes is not a positive multiple of \(VerifiedLayout.blockSize)")
        }
        let count = bytes / VerifiedLayout.blockSize
        guard first < blocks, UInt64(count) <= blocks - first else {
            throw .invalidRequest("blocks \(first)+\(count) are beyond the \(blocks) blocks of the device")
        }
        return count
    }

    func fail(_ e: VerifiedBlockError) -> VerifiedBlockError {
        if let failure { return failure }
        failure = e
        onFailure?(e)
        return e
    }

    static func readRaw(_ t: any BlockTransport, offset: UInt64, count: Int) throws(VerifiedBlockError) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        let r: Result<Void, TransportError> = b.withUnsafeMutableBytes { buffer in
            do throws(TransportError) {
                try t.transfer([TransportRequest(offset: offset, buffer: buffer, write: false)])
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw .transport(e) }
        return b
    }

    /// Every slot's record, in batches; nil where a record is not this device's.
    static func readRecords(_ t: any BlockTransport, layout: VerifiedLayout, deviceID: [UInt8])
        throws(VerifiedBlockError) -> [SlotRecord?]
    {
        let total = Int(layout.blocks) * 2
        var out: [SlotRecord?] = []
        out.reserveCapacity(total)
        let batch = 64
        var buffer = [UInt8](repeating: 0, count: batch * VerifiedLayout.recordSize)
        var i = 0
        while i < total {
            let n = min(batch, total - i)
            let start = i
            let r: Result<Void, TransportError> = buffer.withUnsafeMutableBytes { all in
                let requests = (0..<n).map { k in
                    TransportRequest(
                        offset: layout.recordOffset(block: UInt64((start + k) / 2), slot: (start + k) % 2),
                        buffer: UnsafeMutableRawBufferPointer(
                            rebasing: all[(k * VerifiedLayout.recordSize)..<((k + 1) * VerifiedLayout.recordSize)]),
                        write: false)
                }
                do throws(TransportError) {
                    try t.transfer(requests)
                    return .success(())
                } catch { return .failure(error) }
            }
            if case .failure(let e) = r { throw .transport(e) }
            for k in 0..<n {
                out.append(
                    SlotRecord.decode(
                        buffer.slice(k * VerifiedLayout.recordSize, VerifiedLayout.recordSize), deviceID: deviceID))
            }
            i += n
        }
        return out
    }
}
