import Testing
import VhostUser

/// The vhost-user payload codecs against hand-written wire bytes: little-endian on the
/// wire whatever the host, exact sizes, and a short payload is a typed error (R4).
@Suite struct WirePayloadTests {
    /// `v` as `count` little-endian bytes.
    static func le(_ v: UInt64, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) }
    }

    @Test func headerIsThreeLittleEndianWords() throws {
        let header = MessageHeader(request: 0x0102_0304, flags: HeaderFlags.version | HeaderFlags.needReply, size: 40)
        let wire: [UInt8] =
            [4, 3, 2, 1] + Self.le(UInt64(HeaderFlags.version | HeaderFlags.needReply), 4) + [40, 0, 0, 0]
        #expect(header.encoded == wire)
        #expect(try MessageHeader.decode(wire) == header)
        #expect(throws: VhostUserError.payloadSize(expected: 12, got: 11)) {
            try MessageHeader.decode(Array(wire.prefix(11)))
        }
    }

    @Test func vringAddressLayout() throws {
        let address = VringAddress(
            index: 3, flags: 1, descriptor: 0x1122_3344_5566_7788, used: 0x2000, avail: 0x1000, log: 0xdead_beef)
        let wire =
            Self.le(3, 4) + Self.le(1, 4) + Self.le(0x1122_3344_5566_7788, 8) + Self.le(0x2000, 8)
            + Self.le(0x1000, 8) + Self.le(0xdead_beef, 8)
        #expect(address.encoded == wire)
        #expect(try VringAddress.decode(wire) == address)
        #expect(throws: VhostUserError.payloadSize(expected: 40, got: 39)) {
            try VringAddress.decode(Array(wire.dropLast()))
        }
    }

    @Test func memoryTableLayout() throws {
        let regions = [
            MemoryRegionDescription(guestAddress: 0, size: 0x10000, userAddress: 0x7f00_0000_0000, mmapOffset: 0),
            MemoryRegionDescription(
                guestAddress: 0x10000, size: 0x1000, userAddress: 0x7f00_0001_0000, mmapOffset: 0x10000),
        ]
        let table = MemoryTable(regions: regions)
        var wire = Self.le(2, 4) + Self.le(0, 4)
        for r in regions {
            wire +=
                Self.le(r.guestAddress, 8) + Self.le(r.size, 8) + Self.le(r.userAddress, 8) + Self.le(r.mmapOffset, 8)
        }
        #expect(table.encoded == wire)
        #expect(try MemoryTable.decode(wire) == table)
        #expect(throws: VhostUserError.payloadTooShort(need: 8, have: 4)) {
            try MemoryTable.decode(Array(wire.prefix(4)))
        }
        #expect(throws: VhostUserError.payloadSize(expected: 72, got: 71)) {
            try MemoryTable.decode(Array(wire.dropLast()))
        }
    }

    @Test func configSpaceLayout() throws {
        let config = ConfigSpace(offset: 8, flags: 1, payload: [9, 8, 7])
        let wire = Self.le(8, 4) + Self.le(3, 4) + Self.le(1, 4) + [9, 8, 7]
        #expect(config.encoded == wire)
        #expect(try ConfigSpace.decode(wire) == config)
        #expect(throws: VhostUserError.payloadTooShort(need: 12, have: 11)) {
            try ConfigSpace.decode(Array(wire.prefix(11)))
        }
        #expect(throws: VhostUserError.payloadSize(expected: 15, got: 14)) {
            try ConfigSpace.decode(Array(wire.dropLast()))
        }
    }

    @Test func smallPayloads() throws {
        #expect(U64Payload(0x0102_0304_0506_0708).encoded == [8, 7, 6, 5, 4, 3, 2, 1])
        #expect(try U64Payload.decode([8, 7, 6, 5, 4, 3, 2, 1]).value == 0x0102_0304_0506_0708)
        #expect(VringState(index: 1, num: 256).encoded == [1, 0, 0, 0, 0, 1, 0, 0])
        #expect(try VringState.decode([1, 0, 0, 0, 0, 1, 0, 0]) == VringState(index: 1, num: 256))
        #expect(VringFile(index: 2, noDescriptor: true).encoded == [2, 1, 0, 0, 0, 0, 0, 0])
        #expect(try VringFile.decode([2, 1, 0, 0, 0, 0, 0, 0]) == VringFile(index: 2, noDescriptor: true))
        let single = SingleMemoryRegion(
            MemoryRegionDescription(guestAddress: 1, size: 2, userAddress: 3, mmapOffset: 4))
        #expect(single.encoded == Self.le(0, 8) + Self.le(1, 8) + Self.le(2, 8) + Self.le(3, 8) + Self.le(4, 8))
        #expect(try SingleMemoryRegion.decode(single.encoded) == single)
        #expect(throws: VhostUserError.payloadSize(expected: 8, got: 7)) {
            try U64Payload.decode([0, 0, 0, 0, 0, 0, 0])
        }
    }
}
