import SharedMemory

/// What the chain walker needs to know about a ring format's descriptor tables: where the
/// flags sit, and whether entries are linked by `next` (split) or follow in order (packed).
protocol DescriptorTableFormat {
    static var flagsOffset: Int { get }
    static var followsLinks: Bool { get }
}

/// A split descriptor table (the ring's own, or an indirect one): `{ addr; len; flags; next }`.
enum SplitTableFormat: DescriptorTableFormat {
    static let flagsOffset = SplitLayout.descFlags
    static let followsLinks = true
}

/// A packed indirect table: `{ addr; len; id; flags }`, entries in order, `next` unused.
enum PackedTableFormat: DescriptorTableFormat {
    static let flagsOffset = PackedLayout.descFlags
    static let followsLinks = false
}

/// One bounded walk of a descriptor chain, shared by `DeviceQueue` and `PackedDeviceQueue`
/// so both reject the same hostile chain the same way: indirect tables (negotiated, last,
/// not nested, sane length, translated whole), readable before writable, at most 4 GiB in
/// total, every buffer translated through `GuestMemory` (R2, R3, R5, R7).
///
/// The two formats share NEXT = 1, WRITE = 2, INDIRECT = 4 and the address and length
/// offsets; `DescriptorTableFormat` holds the rest.
struct ChainWalker {
    static let flagNext = SplitLayout.flagNext
    static let flagWrite = SplitLayout.flagWrite
    static let flagIndirect = SplitLayout.flagIndirect
    static let descriptorSize = SplitLayout.descriptorSize

    /// What violations name: the split head, or the packed chain's first slot.
    let head: UInt16
    let features: RingFeatures
    let indirectLimit: Int
    var sawWritable = false
    var total: UInt64 = 0

    @inline(__always)
    init(head: UInt16, features: RingFeatures, indirectLimit: Int) {
        self.head = head
        self.features = features
        self.indirectLimit = indirectLimit
    }

    /// Walks `entries` descriptors of `table` from `start`: by `next` links or in order, as
    /// `F` says, each visited at most once per table (R5). An indirect descriptor met
    /// outside an indirect table switches the walk to its table. `first`: the start
    /// descriptor's address, length and flags, already loaded by the caller (never loaded
    /// again, R2). Returns why the chain is malformed, if it is.
    @inline(__always)
    mutating func walk<F: DescriptorTableFormat>(
        _: F.Type, table: UnsafeMutableRawPointer, entries: Int, from start: Int, inIndirect: Bool,
        first: LoadedDescriptor? = nil, into chain: inout DescriptorChain, memory: GuestMemory
    ) -> Violation? {
        var table = table
        var entries = entries
        var index = start
        var visited = 0
        var inIndirect = inIndirect
        var preloaded = first
        while true {
            visited += 1
            guard visited <= entries else { return .chainTooLong(head: head, limit: entries) }
            let d = table + index * Self.descriptorSize
            // One load per field, into locals; never looked at again (R2).
            let loaded = preloaded ?? LoadedDescriptor(F.self, at: d)
            preloaded = nil
            let untrustedAddress = loaded.address
            let untrustedLength = loaded.length
            let untrustedFlags = loaded.flags
            if untrustedFlags & Self.flagIndirect != 0 {
                guard !inIndirect else { return .nestedIndirect(head: head) }
                switch indirectTable(
                    address: untrustedAddress, length: untrustedLength, flags: untrustedFlags, memory: memory)
                {
                case .failure(let v): return v
                case .success(let t):
                    table = t.base
                    entries = t.entries
                    index = 0
                    visited = 0
                    inIndirect = true
                    continue
                }
            }
            if let v = buffer(
                address: untrustedAddress, length: untrustedLength,
                writable: untrustedFlags & Self.flagWrite != 0, into: &chain, memory: memory)
            {
                return v
            }
            if F.followsLinks {
                guard untrustedFlags & Self.flagNext != 0 else { return nil }
                let untrustedNext = SharedAccess.load16Unaligned(d + SplitLayout.descNext)
                guard Int(untrustedNext) < entries else {
                    return .descriptorNextOutOfRange(head: head, next: untrustedNext, tableSize: entries)
                }
                index = Int(untrustedNext)
            } else {
                index += 1
                if index == entries { return nil }
            }
        }
    }

    /// One descriptor of a packed ring (already loaded once by the caller): a buffer, or an
    /// indirect table walked whole.
    @inline(__always)
    mutating func ringDescriptor(
        address untrustedAddress: UInt64, length untrustedLength: UInt32, flags untrustedFlags: UInt16,
        into chain: inout DescriptorChain, memory: GuestMemory
    ) -> Violation? {
        guard untrustedFlags & Self.flagIndirect != 0 else {
            return buffer(
                address: untrustedAddress, length: untrustedLength,
                writable: untrustedFlags & Self.flagWrite != 0, into: &chain, memory: memory)
        }
        switch indirectTable(address: untrustedAddress, length: untrustedLength, flags: untrustedFlags, memory: memory)
        {
        case .failure(let v): return v
        case .success(let t):
            return walk(
                PackedTableFormat.self, table: t.base, entries: t.entries, from: 0, inIndirect: true, into: &chain,
                memory: memory)
        }
    }

    /// A chain of one direct descriptor (neither NEXT nor INDIRECT: what a net driver
    /// posts per frame), without a walk: the checks `buffer` makes of a chain's only
    /// buffer, on values the caller loaded once (R2). One translation when the buffer lies
    /// in one region; otherwise (unmapped, straddling, overflowing) `buffer`'s own path,
    /// which gives the same answer a walk would. Returns why the chain is malformed.
    @inline(__always)
    static func single(
        head: UInt16, name: UInt16, address: UInt64, length untrustedLength: UInt32, writable: Bool,
        features: RingFeatures, indirectLimit: Int, into chain: inout DescriptorChain, memory: GuestMemory
    ) -> Violation? {
        let length = UInt64(untrustedLength)
        if let piece = try? memory.translate(address, length: length) {
            chain.setSingle(
                head: head, ChainSegment(buffer: piece, guestAddress: address, deviceWritable: writable),
                length: length)
            return nil
        }
        chain.reset(head: head)
        var walker = ChainWalker(head: name, features: features, indirectLimit: indirectLimit)
        return walker.buffer(
            address: address, length: untrustedLength, writable: writable, into: &chain, memory: memory)
    }

    /// Checks an INDIRECT descriptor and translates its whole table once (R3, R5, R7).
    func indirectTable(
        address untrustedAddress: UInt64, length untrustedLength: UInt32, flags untrustedFlags: UInt16,
        memory: GuestMemory
    ) -> Result<(base: UnsafeMutableRawPointer, entries: Int), Violation> {
        guard features.indirectDescriptors else { return .failure(.indirectNotNegotiated(head: head)) }
        guard untrustedFlags & Self.flagNext == 0 else { return .failure(.indirectWithNext(head: head)) }
        let entries = Int(untrustedLength) / Self.descriptorSize
        guard untrustedLength != 0, untrustedLength % 16 == 0, entries <= indirectLimit else {
            return .failure(.indirectTableLength(head: head, length: untrustedLength))
        }
        let buffer: UnsafeMutableRawBufferPointer
        do {
            buffer = try memory.translate(untrustedAddress, length: UInt64(untrustedLength))
        } catch {
            return .failure(.descriptorAddressInvalid(head: head, error))
        }
        guard let base = buffer.baseAddress else {
            return .failure(.indirectTableLength(head: head, length: untrustedLength))
        }
        return .success((base, entries))
    }

    /// Appends one buffer: readable ones before writable ones, the total within 4 GiB, and
    /// translated piece by piece where it straddles adjacent regions (QEMU splits guest RAM).
    @inline(__always)
    mutating func buffer(
        address: UInt64, length untrustedLength: UInt32, writable: Bool, into chain: inout DescriptorChain,
        memory: GuestMemory
    ) -> Violation? {
        if writable {
            sawWritable = true
        } else if sawWritable {
            return .readableAfterWritable(head: head)
        }
        let length = UInt64(untrustedLength)
        total += length  // <= (32768 + 32768) descriptors * 2^32: cannot overflow
        guard total <= UInt64(UInt32.max) else { return .chainLengthOverflow(head: head) }
        guard !address.addingReportingOverflow(length).overflow else {
            return .descriptorAddressInvalid(head: head, .overflow(address: address, length: length))
        }
        // Each piece ends a region, so there are at most `GuestMemory.maximumRegions`
        // pieces (R5); a gap anywhere rejects the chain.
        var pieceAddress = address
        var remaining = length
        repeat {
            let piece: UnsafeMutableRawBufferPointer
            do {
                piece = try memory.translatePrefix(pieceAddress, length: remaining)
            } catch {
                return .descriptorAddressInvalid(head: head, .unmapped(address: address, length: length))
            }
            chain.segments.append(ChainSegment(buffer: piece, guestAddress: pieceAddress, deviceWritable: writable))
            pieceAddress &+= UInt64(piece.count)
            remaining -= UInt64(piece.count)
        } while remaining > 0
        if writable {
            chain.writableLength += length
        } else {
            chain.readableLength += length
            chain.firstWritable = chain.segments.count
        }
        return nil
    }
}

/// A descriptor's address, length and flags, each loaded once (R2).
struct LoadedDescriptor {
    let address: UInt64
    let length: UInt32
    let flags: UInt16

    @inline(__always)
    init(address: UInt64, length: UInt32, flags: UInt16) {
        self.address = address
        self.length = length
        self.flags = flags
    }

    /// Loads the three fields of the descriptor at `d`, in format `F`.
    @inline(__always)
    init<F: DescriptorTableFormat>(_: F.Type, at d: UnsafeMutableRawPointer) {
        address = SharedAccess.load64Unaligned(d + SplitLayout.descAddr)
        length = SharedAccess.load32Unaligned(d + SplitLayout.descLen)
        flags = SharedAccess.load16Unaligned(d + F.flagsOffset)
    }
}

extension DescriptorTableFormat {
    /// Offset of the field after flags (split) or before them (packed): `next` or `id`.
    static var linkOffset: Int { followsLinks ? SplitLayout.descNext : PackedLayout.descID }
}

extension DriverRingMemory {
    /// Whether a request of `count` segments goes through an indirect table: negotiated,
    /// tables placed, above the caller's threshold, and fitting one table.
    @inline(__always)
    func usesIndirect(_ count: Int, threshold: Int, features: RingFeatures) -> Bool {
        features.indirectDescriptors && indirect != nil && count > threshold && count <= indirectTableEntries
    }

    /// Writes `segments` (write-only, R1) into the indirect table of `index` in `tables`, a head or buffer
    /// id, whose table is free exactly when it is; in format `F`, the driver-side mirror of
    /// `ChainWalker`. Returns the table's guest address, its length and the writable bytes.
    @inline(__always)
    func writeIndirectTable<F: DescriptorTableFormat>(
        _: F.Type, in tables: UnsafeMutableRawPointer, index: UInt16, segments: UnsafeBufferPointer<Segment>
    ) -> (address: UInt64, length: UInt32, writable: UInt64) {
        let tableOffset = Int(index) * indirectTableEntries * ChainWalker.descriptorSize
        let base = tables + tableOffset
        var writable: UInt64 = 0
        let count = segments.count
        for i in 0..<count {
            let s = segments[i]
            var flags: UInt16 = F.followsLinks && i + 1 < count ? ChainWalker.flagNext : 0
            if s.deviceWritable {
                flags |= ChainWalker.flagWrite
                writable &+= UInt64(s.length)
            }
            let e = base + i * ChainWalker.descriptorSize
            SharedAccess.store64(e + SplitLayout.descAddr, s.address)
            SharedAccess.store32(e + SplitLayout.descLen, s.length)
            SharedAccess.store16(e + F.flagsOffset, flags)
            SharedAccess.store16(e + F.linkOffset, F.followsLinks ? UInt16(truncatingIfNeeded: i + 1) : 0)
        }
        return (
            indirectGuestAddress &+ UInt64(tableOffset), UInt32(truncatingIfNeeded: count * ChainWalker.descriptorSize),
            writable
        )
    }
}
