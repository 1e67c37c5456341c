import Glibc
import SharedMemory
import Testing
import Virtqueue

/// QEMU may announce guest RAM as several adjacent regions; a driver's buffer can cross
/// the boundary. The device walks it piece by piece, and still rejects any gap.
@Suite struct StraddlingRegionTests {
    static let base: UInt64 = 0x10_0000

    /// Two regions over the two halves of one sealed memfd, adjacent (or not) in guest space.
    static func memory(gap: UInt64 = 0) throws -> (SharedRegion, GuestMemory) {
        let backing = try SharedRegion(name: "straddle", size: 1 << 17)
        let half = UInt64(1 << 16)
        let a = try SharedRegion(mapping: OwnedDescriptor(dup(backing.fileDescriptor)), offset: 0, size: half)
        let b = try SharedRegion(mapping: OwnedDescriptor(dup(backing.fileDescriptor)), offset: half, size: half)
        let memory = try GuestMemory([
            GuestRegion(guestAddress: base, userAddress: base, mapping: a),
            GuestRegion(guestAddress: base + half + gap, userAddress: base + half + gap, mapping: b),
        ])
        return (backing, memory)
    }

    @Test func translatePrefixStopsAtRegionEnd() throws {
        let (_, memory) = try Self.memory()
        let end = Self.base + (1 << 16)
        #expect(try memory.translatePrefix(end - 100, length: 300).count == 100)
        #expect(try memory.translatePrefix(end, length: 300).count == 300)
        #expect(try memory.translatePrefix(end - 1, length: 0).count == 0)
        #expect(throws: TranslationError.self) { try memory.translatePrefix(.max - 10, length: 20) }
        #expect(throws: TranslationError.self) { try memory.translatePrefix(0, length: 1) }
    }

    static func queue(_ memory: GuestMemory) throws -> DeviceQueue {
        try DeviceQueue(
            queueSize: 8, descriptorAddress: base, availAddress: base + 0x100, usedAddress: base + 0x200,
            features: RingFeatures(), memory: memory)
    }

    static func post(_ backing: SharedRegion, address: UInt64, length: UInt32) {
        let d = backing.base
        d.storeBytes(of: address, toByteOffset: 0, as: UInt64.self)
        d.storeBytes(of: length, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: SplitLayout.flagWrite, toByteOffset: 12, as: UInt16.self)
        (backing.base + 0x100 + 4).storeBytes(of: UInt16(0), as: UInt16.self)
        (backing.base + 0x100 + 2).storeBytes(of: UInt16(1), as: UInt16.self)
    }

    @Test func bufferAcrossAdjacentRegionsIsSplitIntoPieces() throws {
        let (backing, memory) = try Self.memory()
        let q = try Self.queue(memory)
        let start = Self.base + (1 << 16) - 1000
        Self.post(backing, address: start, length: 3000)
        var chain = DescriptorChain()
        #expect(try q.nextChain(into: &chain, memory: memory) == .ready)
        #expect(chain.segments.map(\.buffer.count) == [1000, 2000])
        #expect(chain.segments.map(\.guestAddress) == [start, start + 1000])
        #expect(chain.writableLength == 3000 && chain.firstWritable == 0)
        // The pieces are the right bytes: both map the same memfd contiguously.
        chain.segments[1].buffer[0] = 0x77
        #expect(backing.base.load(fromByteOffset: 1 << 16, as: UInt8.self) == 0x77)
    }

    @Test func bufferAcrossAGapIsRejected() throws {
        let (backing, memory) = try Self.memory(gap: 4096)
        let q = try Self.queue(memory)
        Self.post(backing, address: Self.base + (1 << 16) - 1000, length: 3000)
        var chain = DescriptorChain()
        guard case .rejected(0, .descriptorAddressInvalid) = try q.nextChain(into: &chain, memory: memory) else {
            Issue.record("a buffer over a gap must be rejected")
            return
        }
        #expect(!q.isBroken)
    }
}
