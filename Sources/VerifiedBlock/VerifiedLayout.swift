/// Where things are on the back-end's disk (docs/verified-block.md): a superblock, then per
/// logical block two slots of [4096 bytes sealed data | 512 bytes record]. A write goes to
/// the slot that is not live, so the live one survives any crash of either side.
public struct VerifiedLayout: Sendable, Equatable {
    public static let blockSize = 4096
    public static let recordSize = 512
    public static let slotSize = blockSize + recordSize
    public static let superblockSize = 4096

    public let blocks: UInt64

    /// The layout a disk of `capacity` bytes holds; nil if not even one block fits.
    public init?(capacity: UInt64) {
        guard capacity > UInt64(Self.superblockSize) else { return nil }
        let n = (capacity - UInt64(Self.superblockSize)) / UInt64(2 * Self.slotSize)
        guard n >= 1 else { return nil }
        blocks = n
    }

    public init(blocks: UInt64) { self.blocks = blocks }

    public func slotOffset(block: UInt64, slot: Int) -> UInt64 {
        UInt64(Self.superblockSize) + (2 * block + UInt64(slot)) * UInt64(Self.slotSize)
    }

    public func recordOffset(block: UInt64, slot: Int) -> UInt64 {
        slotOffset(block: block, slot: slot) + UInt64(Self.blockSize)
    }

    public var logicalBytes: UInt64 { blocks * UInt64(Self.blockSize) }
}

/// The 512-byte record after each slot's data: which device, block and version the data
/// was sealed as, and its tag. Untrusted when read: it only names a lie, the AEAD and
/// the anchored tree decide.
struct SlotRecord: Equatable {
    static let magic: [UInt8] = Array("RFVBSLOT".utf8)
    var block: UInt64
    var version: UInt64
    var tag: [UInt8]

    func encode(deviceID: [UInt8]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: VerifiedLayout.recordSize)
        b.put(Self.magic, at: 0)
        b.put(deviceID, at: 8)
        b.putLE(block, at: 24)
        b.putLE(version, at: 32)
        b.put(tag, at: 40)
        return b
    }

    /// nil for a record that is not ours (another format, never written, garbage).
    static func decode(_ b: [UInt8], deviceID: [UInt8]) -> SlotRecord? {
        guard b.count >= 56, b.slice(0, 8) == magic, b.slice(8, 16) == deviceID else { return nil }
        return SlotRecord(block: b.le64(at: 24), version: b.le64(at: 32), tag: b.slice(40, 16))
    }
}

/// The superblock: what was formatted (the anchor is the authority; this lets a reader
/// see the device is the anchored one before reading anything else).
struct Superblock: Equatable {
    static let magic: [UInt8] = Array("RFVBSUPR".utf8)
    static let formatVersion: UInt32 = 1
    var deviceID: [UInt8]
    var blocks: UInt64

    func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: VerifiedLayout.superblockSize)
        b.put(Self.magic, at: 0)
        b.putLE32(Self.formatVersion, at: 8)
        b.putLE32(UInt32(VerifiedLayout.blockSize), at: 12)
        b.put(deviceID, at: 16)
        b.putLE(blocks, at: 32)
        return b
    }

    static func decode(_ b: [UInt8]) -> Superblock? {
        guard b.count >= 40, b.slice(0, 8) == magic, b.le32(at: 8) == formatVersion,
            b.le32(at: 12) == UInt32(VerifiedLayout.blockSize)
        else { return nil }
        return Superblock(deviceID: b.slice(16, 16), blocks: b.le64(at: 32))
    }
}
