/// One region of memory shared by the driver, as the device sees it.
///
/// `guestAddress` is the address descriptors use; `userAddress` is the
/// "frontend virtual address" vhost-user uses for ring addresses. Both are synthetic
/// when we are the driver (rule R7): neither reveals where anything lives in our process.
public struct GuestRegion: Sendable {
    public let guestAddress: UInt64
    public let userAddress: UInt64
    public let size: UInt64
    /// The local mapping backing this region (kept alive by the region).
    public let mapping: SharedRegion

    public init(guestAddress: UInt64, userAddress: UInt64, mapping: SharedRegion) {
        self.guestAddress = guestAddress
        self.userAddress = userAddress
        self.size = UInt64(mapping.size)
        self.mapping = mapping
    }

    var guestEnd: UInt64 { guestAddress &+ size }  // checked non-overflowing at insertion
    var userEnd: UInt64 { userAddress &+ size }
}

/// Why an address the other side gave us cannot be used.
public enum TranslationError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `address + length` wraps past 2^64.
    case overflow(address: UInt64, length: UInt64)
    /// No single region holds `[address, address+length)` (gap, out of range, or straddling).
    case unmapped(address: UInt64, length: UInt64)

    public var description: String {
        switch self {
        case .overflow(let a, let l):
            return "address 0x\(String(a, radix: 16)) + length \(l) overflows 64 bits"
        case .unmapped(let a, let l):
            return "range 0x\(String(a, radix: 16))+\(l) is not inside one shared region"
        }
    }
}

/// Why a region table is refused.
public enum RegionTableError: Error, Equatable, Sendable, CustomStringConvertible {
    case tooManyRegions(count: Int, limit: Int)
    case overlap(guestAddress: UInt64)
    case overflow(guestAddress: UInt64, size: UInt64)
    case emptyRegion(guestAddress: UInt64)

    public var description: String {
        switch self {
        case .tooManyRegions(let c, let l): return "\(c) memory regions exceed the limit of \(l)"
        case .overlap(let a): return "memory region at 0x\(String(a, radix: 16)) overlaps another"
        case .overflow(let a, let s): return "memory region 0x\(String(a, radix: 16))+\(s) wraps 2^64"
        case .emptyRegion(let a): return "memory region at 0x\(String(a, radix: 16)) is empty"
        }
    }
}

/// One region's guest-address bounds and local base, as plain values: a batch of
/// translations that mostly land in the region the previous one did (DPDK's
/// `vhost_iova_to_vva` keeps the last region for the same reason) checks them here first,
/// with the same bounds test `GuestMemory.translate` makes, and asks `GuestMemory` only on
/// a miss. Valid only while the `GuestMemory` it came from is (hold it for the batch, never
/// across a memory-table change).
@frozen
public struct RegionWindow {
    public let start: UInt64
    public let size: UInt64
    public let base: UnsafeMutableRawPointer?

    /// The empty window: translates nothing.
    @inlinable
    public init() {
        start = 0
        size = 0
        base = nil
    }

    init(start: UInt64, size: UInt64, base: UnsafeMutableRawPointer) {
        self.start = start
        self.size = size
        self.base = base
    }

    /// `[address, address+length)` in local memory if this region holds all of it, else
    /// nil. `length == 0` still requires `address` inside the region; no overflow is
    /// possible (the region's end was checked at insertion).
    @inlinable @inline(__always)
    public func translate(_ address: UInt64, length: UInt64) -> UnsafeMutableRawBufferPointer? {
        let offset = address &- start
        guard offset < size, length <= size &- offset, let base else { return nil }
        return UnsafeMutableRawBufferPointer(start: base + Int(offset), count: Int(length))
    }
}

/// The table of shared regions, and the one checked way to turn a foreign address into
/// a pointer (`vm-memory`'s discipline): no code indexes shared memory with an address
/// the peer supplied except through `translate`.
public struct GuestMemory: Sendable {
    public static let maximumRegions = 8

    /// Sorted by guest address, non-overlapping in both address spaces.
    public private(set) var regions: [GuestRegion]

    public init() { regions = [] }

    public init(_ regions: [GuestRegion]) throws(RegionTableError) {
        self.regions = []
        for r in regions { try add(r) }
    }

    public mutating func add(_ region: GuestRegion) throws(RegionTableError) {
        guard regions.count < Self.maximumRegions else {
            throw .tooManyRegions(count: regions.count + 1, limit: Self.maximumRegions)
        }
        guard region.size > 0 else { throw .emptyRegion(guestAddress: region.guestAddress) }
        guard !region.guestAddress.addingReportingOverflow(region.size).overflow,
            !region.userAddress.addingReportingOverflow(region.size).overflow
        else { throw .overflow(guestAddress: region.guestAddress, size: region.size) }
        for r in regions {
            let guestOverlap = region.guestAddress < r.guestEnd && r.guestAddress < region.guestEnd
            let userOverlap = region.userAddress < r.userEnd && r.userAddress < region.userEnd
            if guestOverlap || userOverlap { throw .overlap(guestAddress: region.guestAddress) }
        }
        regions.append(region)
        regions.sort { $0.guestAddress < $1.guestAddress }
    }

    /// Removes the region that starts at `guestAddress` with `size`; returns whether found.
    @discardableResult
    public mutating func remove(guestAddress: UInt64, size: UInt64) -> Bool {
        guard let i = regions.firstIndex(where: { $0.guestAddress == guestAddress && $0.size == size })
        else { return false }
        regions.remove(at: i)
        return true
    }

    /// Checked translation of a guest-physical range to local memory.
    /// `length == 0` still requires `address` to lie inside a region.
    @inline(__always)
    public func translate(_ address: UInt64, length: UInt64) throws(TranslationError)
        -> UnsafeMutableRawBufferPointer
    {
        try translate(address, length: length, start: \.guestAddress)
    }

    /// Translates a vhost-user "user" (frontend virtual) address, used for ring addresses.
    public func translateUser(_ address: UInt64, length: UInt64) throws(TranslationError)
        -> UnsafeMutableRawBufferPointer
    {
        try translate(address, length: length, start: \.userAddress)
    }

    /// Translates the longest prefix of `[address, address+length)` that lies inside one
    /// region. Guest RAM may be announced as several adjacent regions (QEMU splits RAM
    /// below 4 GiB around holes), and a real driver's buffer may straddle two of them:
    /// callers walk such a buffer piece by piece, each piece checked here.
    /// `length == 0` still requires `address` to lie inside a region.
    @inline(__always)
    public func translatePrefix(_ address: UInt64, length: UInt64) throws(TranslationError)
        -> UnsafeMutableRawBufferPointer
    {
        try translate(address, length: length, start: \.guestAddress, prefix: true)
    }

    /// The one lookup behind all three: the region holding `address` must hold the whole
    /// range (or, for `prefix`, supplies as much of it as it holds).
    @inline(__always)
    func translate(_ address: UInt64, length: UInt64, start: KeyPath<GuestRegion, UInt64>, prefix: Bool = false)
        throws(TranslationError) -> UnsafeMutableRawBufferPointer
    {
        guard !address.addingReportingOverflow(length).overflow else {
            throw .overflow(address: address, length: length)
        }
        for r in regions {
            let first = r[keyPath: start]
            guard address >= first, address - first < r.size else { continue }
            let room = r.size - (address - first)
            guard prefix || length <= room else { break }
            return UnsafeMutableRawBufferPointer(
                start: r.mapping.base + Int(address - first), count: Int(min(length, room)))
        }
        throw .unmapped(address: address, length: length)
    }

    /// The region holding guest address `address`, as a `RegionWindow` (an empty window,
    /// which holds nothing, when no region does).
    public func window(containing address: UInt64) -> RegionWindow {
        for r in regions where address >= r.guestAddress && address - r.guestAddress < r.size {
            return RegionWindow(start: r.guestAddress, size: r.size, base: r.mapping.base)
        }
        return RegionWindow()
    }

    /// Converts a user address to the guest address of the same byte.
    public func guestAddress(ofUser address: UInt64) -> UInt64? {
        for r in regions where address >= r.userAddress && address < r.userEnd {
            return r.guestAddress + (address - r.userAddress)
        }
        return nil
    }
}
