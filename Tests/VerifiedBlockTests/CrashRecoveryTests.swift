import Foundation
import Testing

@testable import VerifiedBlock

/// A crash at any point leaves each block old or new, never corrupt, and never reuses a nonce.
@Suite("VerifiedBlock: crash consistency (in memory)")
struct CrashRecoveryTests {
    @Test func unflushedCompleteWriteReadsNewAfterCrash() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 1, bytes: block(1))
        try d.flush()
        try d.write(block: 1, bytes: block(2))
        // Crash: no flush, the device object is dropped.
        let again = try bed.open()
        #expect(try again.read(block: 1, count: 1) == block(2))
        #expect(again.pendingWrites == 0)
    }

    @Test func tornSlotReadsOldAfterCrashAndStaysOpenable() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 1, bytes: block(1))
        try d.flush()
        // The back-end dies half-way through the next slot: only its record sector lands.
        let target = d.otherSlotOffset(1)
        let store = bed.transport
        store.onWrite = { offset, data in
            guard offset == target else { return true }
            store.bytes.withUnsafeMutableBytes { disk in
                UnsafeMutableRawBufferPointer(rebasing: disk[Int(offset) + 4096..<Int(offset) + 4608])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[4096..<4608]))
            }
            return false
        }
        try d.write(block: 1, bytes: block(2))
        let reserved = d.nextVersion
        store.onWrite = nil
        let again = try bed.open()
        #expect(try again.read(block: 1, count: 1) == block(1))
        #expect(again.nextVersion >= reserved, "versions (nonces) after a crash start above every reserved one")
        try again.write(block: 5, bytes: block(5))
        try again.flush()
        let third = try bed.open()
        #expect(try third.read(block: 1, count: 1) == block(1))
        #expect(try third.read(block: 5, count: 1) == block(5))
    }

    @Test func crashBeforeAnyByteLandedReadsOld() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 3, bytes: block(3))
        try d.flush()
        bed.transport.onWrite = { _, _ in false }
        try d.write(block: 3, bytes: block(4, count: 2))
        bed.transport.onWrite = nil
        let again = try bed.open()
        #expect(try again.read(block: 3, count: 2) == block(3) + [UInt8](repeating: 0, count: 4096))
    }

    @Test func rewriteBeforeFlushNeverTouchesTheDurableSlot() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 2, bytes: block(1))
        try d.flush()
        let durableSlot = Int(d.liveSlotOffset(2))
        let before = Array(bed.transport.bytes[durableSlot..<durableSlot + 4608])
        try d.write(block: 2, bytes: block(2))
        try d.write(block: 2, bytes: block(3))
        #expect(bed.transport.flushes == 2, "no flush forced by the rewrite")
        #expect(Array(bed.transport.bytes[durableSlot..<durableSlot + 4608]) == before)
        let again = try bed.open()
        #expect(try again.read(block: 2, count: 1) == block(3))
    }

    @Test func tornRewriteBeforeFlushReadsTheFlushedContent() throws {
        let bed = Bed()
        let d = try bed.format()
        try d.write(block: 4, bytes: block(1))
        try d.flush()
        try d.write(block: 4, bytes: block(2))
        let target = d.liveSlotOffset(4)
        let store = bed.transport
        store.onWrite = { offset, data in
            guard offset == target else { return true }
            // Only the record lands: its data is still the previous write's.
            store.bytes.withUnsafeMutableBytes { disk in
                UnsafeMutableRawBufferPointer(rebasing: disk[Int(offset) + 4096..<Int(offset) + 4608])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[4096..<4608]))
            }
            return false
        }
        try d.write(block: 4, bytes: block(3))
        store.onWrite = nil
        let again = try bed.open()
        #expect(try again.read(block: 4, count: 1) == block(1))
        let third = try bed.open()
        #expect(try third.read(block: 4, count: 1) == block(1))
    }
}
