import SharedMemory
import Testing

/// The region table a device builds from the driver's announcements (vhost-user
/// SET_MEM_TABLE): every malformed table is refused with its reason, and a refused region
/// leaves the table as it was.
@Suite struct GuestMemoryTableTests {
    static func region(_ pages: Int = 2) throws -> SharedRegion { try SharedRegion(name: "t", size: pages * 4096) }

    @Test func overlapInGuestSpaceIsRefused() throws {
        var memory = GuestMemory()
        try memory.add(GuestRegion(guestAddress: 0x10000, userAddress: 0x100_0000, mapping: try Self.region()))
        for guest: UInt64 in [0x10000, 0x11000, 0xF001, 0x8000 + 0x1000] {
            let r = GuestRegion(guestAddress: guest, userAddress: 0x900_0000, mapping: try Self.region(8))
            #expect(throws: RegionTableError.overlap(guestAddress: guest)) { try memory.add(r) }
        }
        #expect(memory.regions.count == 1)
    }

    @Test func overlapInUserSpaceIsRefused() throws {
        var memory = GuestMemory()
        try memory.add(GuestRegion(guestAddress: 0x10000, userAddress: 0x100_0000, mapping: try Self.region()))
        for user: UInt64 in [0x100_0000, 0x100_1FFF, 0xFF_F001] {
            let r = GuestRegion(guestAddress: 0x80_0000, userAddress: user, mapping: try Self.region())
            #expect(throws: RegionTableError.overlap(guestAddress: 0x80_0000)) { try memory.add(r) }
        }
        #expect(memory.regions.count == 1)
    }

    @Test func adjacentRegionsAreAcceptedButATranslationMayNotStraddleThem() throws {
        let low = try Self.region()
        let high = try Self.region()
        let memory = try GuestMemory([
            GuestRegion(guestAddress: 0x2000, userAddress: 0x10_2000, mapping: high),
            GuestRegion(guestAddress: 0x0, userAddress: 0x10_0000, mapping: low),
        ])
        #expect(memory.regions.map(\.guestAddress) == [0, 0x2000])  // sorted
        #expect(try memory.translate(0x1FFF, length: 1).baseAddress == low.base + 0x1FFF)
        #expect(try memory.translate(0x2000, length: 1).baseAddress == high.base)
        // Contiguous to the device, not to us: one range must lie inside one mapping.
        #expect(throws: TranslationError.unmapped(address: 0x1FFF, length: 2)) {
            try memory.translate(0x1FFF, length: 2)
        }
        #expect(throws: TranslationError.unmapped(address: 0x10_1FFF, length: 2)) {
            try memory.translateUser(0x10_1FFF, length: 2)
        }
    }

    @Test func moreThanEightRegionsAreRefused() throws {
        var memory = GuestMemory()
        for i in 0..<8 {
            try memory.add(
                GuestRegion(
                    guestAddress: UInt64(i) << 20, userAddress: 0x1_0000_0000 + UInt64(i) << 20,
                    mapping: try Self.region(1)))
        }
        let ninth = GuestRegion(guestAddress: 8 << 20, userAddress: 0x1_0800_0000, mapping: try Self.region(1))
        #expect(throws: RegionTableError.tooManyRegions(count: 9, limit: 8)) { try memory.add(ninth) }
        #expect(memory.regions.count == 8)
        #expect(throws: TranslationError.unmapped(address: 8 << 20, length: 1)) {
            try memory.translate(8 << 20, length: 1)
        }
    }

    @Test(arguments: [UInt64.max - 4095, .max - 100, .max, 1 << 63 | (UInt64.max >> 1 - 4094)])
    func regionWrappingTheGuestAddressSpaceIsRefused(guest: UInt64) throws {
        var memory = GuestMemory()
        let r = GuestRegion(guestAddress: guest, userAddress: 0x1000, mapping: try Self.region(1))
        #expect(throws: RegionTableError.overflow(guestAddress: guest, size: 4096)) { try memory.add(r) }
        #expect(memory.regions.isEmpty)
    }

    @Test func regionWrappingTheUserAddressSpaceIsRefused() throws {
        var memory = GuestMemory()
        let r = GuestRegion(guestAddress: 0x1000, userAddress: .max - 10, mapping: try Self.region(1))
        #expect(throws: RegionTableError.overflow(guestAddress: 0x1000, size: 4096)) { try memory.add(r) }
    }

    @Test func regionEndingJustBelowTheTopIsAccepted() throws {
        var memory = GuestMemory()
        let region = try Self.region(1)
        try memory.add(GuestRegion(guestAddress: UInt64.max - 4096, userAddress: 0x1000, mapping: region))
        #expect(try memory.translate(.max - 1, length: 1).baseAddress == region.base + 4095)
        #expect(throws: TranslationError.overflow(address: .max - 1, length: 2)) {
            try memory.translate(.max - 1, length: 2)
        }
        #expect(throws: TranslationError.unmapped(address: .max, length: 0)) { try memory.translate(.max, length: 0) }
    }

    @Test(arguments: [0, -1, (1 << 40) + 1])
    func emptyOrAbsurdRegionCannotBeCreated(size: Int) {
        // An empty `GuestRegion` cannot exist: its size comes from a mapping, and mappings refuse 0.
        #expect(throws: SharedRegion.Error.invalidSize(size)) { try SharedRegion(name: "t", size: size) }
    }

    @Test func translationEdgesOfOneRegion() throws {
        let region = try Self.region()
        let memory = try GuestMemory([GuestRegion(guestAddress: 0x1_0000, userAddress: 0x7F00_0000, mapping: region)])
        let end: UInt64 = 0x1_0000 + 8192
        #expect(try memory.translate(0x1_0000, length: 0).baseAddress == region.base)
        #expect(try memory.translate(0x1_0000, length: 8192).count == 8192)
        #expect(try memory.translate(end - 1, length: 1).baseAddress == region.base + 8191)
        #expect(try memory.translate(end - 1, length: 0).count == 0)
        #expect(throws: TranslationError.unmapped(address: end, length: 0)) { try memory.translate(end, length: 0) }
        #expect(throws: TranslationError.unmapped(address: 0x1_0000, length: 8193)) {
            try memory.translate(0x1_0000, length: 8193)
        }
        #expect(throws: TranslationError.unmapped(address: 0xFFFF, length: 2)) {
            try memory.translate(0xFFFF, length: 2)
        }
        #expect(throws: TranslationError.overflow(address: 0x1_0000, length: .max)) {
            try memory.translate(0x1_0000, length: .max)
        }
        // The two address spaces are never confused.
        #expect(throws: TranslationError.unmapped(address: 0x7F00_0000, length: 1)) {
            try memory.translate(0x7F00_0000, length: 1)
        }
        #expect(throws: TranslationError.unmapped(address: 0x1_0000, length: 1)) {
            try memory.translateUser(0x1_0000, length: 1)
        }
        #expect(try memory.translateUser(0x7F00_0000 + 100, length: 8092).baseAddress == region.base + 100)
        #expect(throws: TranslationError.unmapped(address: 0x7F00_0000 + 100, length: 8093)) {
            try memory.translateUser(0x7F00_0000 + 100, length: 8093)
        }
        #expect(throws: TranslationError.overflow(address: .max, length: 1)) {
            try memory.translateUser(.max, length: 1)
        }
        #expect(memory.guestAddress(ofUser: 0x7F00_0000 + 8191) == 0x1_0000 + 8191)
        #expect(memory.guestAddress(ofUser: 0x7F00_0000 + 8192) == nil)
        #expect(memory.guestAddress(ofUser: 0x1_0000) == nil)
    }

    @Test func removedRegionNoLongerTranslates() throws {
        var memory = try GuestMemory([
            GuestRegion(guestAddress: 0x1_0000, userAddress: 0x7F00_0000, mapping: try Self.region())
        ])
        #expect(memory.remove(guestAddress: 0x1_0000, size: 4096) == false)  // wrong size
        #expect(memory.remove(guestAddress: 0x1_0000, size: 8192) == true)
        #expect(throws: TranslationError.unmapped(address: 0x1_0000, length: 1)) {
            try memory.translate(0x1_0000, length: 1)
        }
        #expect(memory.remove(guestAddress: 0x1_0000, size: 8192) == false)
    }

    @Test func tableWithOverlapIsRefusedAsAWhole() throws {
        #expect(throws: RegionTableError.overlap(guestAddress: 0x1000)) {
            try GuestMemory([
                GuestRegion(guestAddress: 0, userAddress: 0, mapping: try Self.region()),
                GuestRegion(guestAddress: 0x1000, userAddress: 0x10_0000, mapping: try Self.region()),
            ])
        }
    }
}
