import Testing
import VirtioFS

/// READDIRPLUS parsing (`FSReply.directoryPlus`) against forged listings.
struct DirentTests {
    /// One direntplus record; `nameLength` may lie about `name`.
    func record(
        nodeID: UInt64, offset: UInt64, name: [UInt8], nameLength: UInt32? = nil, mode: UInt32 = 0o100644,
        pad: Bool = true
    )
        -> [UInt8]
    {
        var w = FuseWriter()
        var e = FuseEntryOut()
        e.nodeID = nodeID
        e.attr.mode = mode
        e.attr.ino = nodeID
        e.encode(into: &w)
        w.put(nodeID)
        w.put(offset)
        w.put(nameLength ?? UInt32(name.count))
        w.put(UInt32(8))
        w.append(name)
        if pad { w.align8() }
        return w.bytes
    }

    func parse(_ bytes: [UInt8]) throws -> [String] {
        var seen = Set<UInt64>()
        return try FSReply.directoryPlus(bytes[...], seen: &seen).entries.map(\.name)
    }

    @Test func wellFormedListingSkipsDotEntries() throws {
        let bytes =
            record(nodeID: 0, offset: 1, name: [0x2e], mode: 0o40755)
            + record(nodeID: 0, offset: 2, name: [0x2e, 0x2e], mode: 0o40755)
            + record(nodeID: 5, offset: 3, name: Array("a".utf8))
            + record(nodeID: 6, offset: 4, name: Array("bcdefghij".utf8))
        #expect(try parse(bytes) == ["a", "bcdefghij"])
    }

    @Test func partialTrailingHeaderIsIgnored() throws {
        let bytes = record(nodeID: 5, offset: 3, name: Array("a".utf8)) + [UInt8](repeating: 0xee, count: 40)
        #expect(try parse(bytes) == ["a"])
    }

    @Test func nameLengthZeroIsAViolation() {
        #expect(throws: FSViolation.direntNameLength(0)) {
            try parse(record(nodeID: 5, offset: 1, name: [], nameLength: 0) + [UInt8](repeating: 0, count: 8))
        }
    }

    @Test func nameLength4095IsAViolation() {
        #expect(throws: FSViolation.direntNameLength(4095)) {
            try parse(record(nodeID: 5, offset: 1, name: Array("a".utf8), nameLength: 4095))
        }
    }

    @Test func nameRunningPastTheBufferIsAViolation() {
        let bytes = record(nodeID: 5, offset: 1, name: Array("abc".utf8), nameLength: 200)
        #expect(throws: FSViolation.direntPastBuffer(offset: 0, length: 352, buffer: bytes.count)) { try parse(bytes) }
    }

    @Test func misalignedRecordIsAViolation() {
        // Padding left out: the padded length runs past the reply.
        let bytes = record(nodeID: 5, offset: 1, name: Array("abc".utf8), pad: false)
        #expect(throws: FSViolation.direntPastBuffer(offset: 0, length: 160, buffer: 155)) { try parse(bytes) }
    }

    @Test func nameWithSlashOrNULIsAViolation() {
        #expect(throws: FSViolation.direntName("../etc")) {
            try parse(record(nodeID: 5, offset: 1, name: Array("../etc".utf8)))
        }
        #expect(throws: FSViolation.direntName("a\0b")) {
            try parse(record(nodeID: 5, offset: 1, name: [0x61, 0, 0x62]))
        }
    }

    @Test func nodeIDZeroOrRootInAListingIsAViolation() {
        #expect(throws: FSViolation.nodeIDInvalid(opcode: "READDIRPLUS", nodeID: 0)) {
            try parse(record(nodeID: 0, offset: 1, name: Array("x".utf8)))
        }
        #expect(throws: FSViolation.nodeIDInvalid(opcode: "READDIRPLUS", nodeID: 1)) {
            try parse(record(nodeID: 1, offset: 1, name: Array("x".utf8)))
        }
    }

    @Test func offsetComingBackIsAnEndlessListing() {
        let bytes =
            record(nodeID: 5, offset: 9, name: Array("a".utf8)) + record(nodeID: 6, offset: 9, name: Array("b".utf8))
        #expect(throws: FSViolation.direntOffset(offset: 9)) { try parse(bytes) }
        // Across calls of the same listing too.
        var seen: Set<UInt64> = [9]
        #expect(throws: FSViolation.direntOffset(offset: 9)) {
            try FSReply.directoryPlus(record(nodeID: 5, offset: 9, name: Array("a".utf8))[...], seen: &seen)
        }
        #expect(throws: FSViolation.direntOffset(offset: 0)) {
            try parse(record(nodeID: 5, offset: 0, name: Array("a".utf8)))
        }
    }
}
