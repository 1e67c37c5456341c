import Adversary
import SharedMemory
import Testing
@testable import XenRing

/// R1 and R7 on the frontend: what it shares is written, never read back; pages are
/// zeroed before being granted; grants are revoked, and a revoked ref can be reused only
/// when try-end succeeded.
@Suite struct FrontendSharingTests {
    /// Refs are handed out one per 64-byte line of the table before any line's second
    /// entry (no two live grants share a cache line while fewer than 63 are out), every
    /// usable ref exactly once, never a reserved one.
    @Test func refsAreSpreadOverCacheLines() throws {
        let p = try XenPair()
        let issuer = GrantIssuer(memory: p.memory)
        let usable = p.memory.entryCount - GrantLayout.reservedEntries
        #expect(issuer.available == usable)
        var refs: [UInt32] = []
        while let ref = issuer.grant(frame: 1, readOnly: true) { refs.append(ref) }
        #expect(refs.count == usable)
        #expect(Set(refs).count == usable)
        #expect(refs.allSatisfy { Int($0) >= GrantLayout.reservedEntries && Int($0) < p.memory.entryCount })
        let lines = p.memory.entryCount / 8
        for slot in 0..<8 {
            let round = refs[(slot * (lines - 1))..<((slot + 1) * (lines - 1))]
            #expect(round.map { Int($0) } == (1..<lines).map { $0 * 8 + slot }, "entry \(slot) of every line")
        }
    }

    /// R7: a bounce page granted for the first time is zero; a partial page's tail is
    /// zeroed; a reused page holds only bytes this backend has already been shown.
    @Test func grantedPagesHoldNothingPrivate() throws {
        let p = try XenPair()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        try p.front.submitRead(sector: 0, into: buffer, token: 1)
        let readFrame = p.front.segmentFrames[0]
        #expect(UnsafeRawBufferPointer(start: p.memory.page(readFrame), count: 4096).allSatisfy { $0 == 0 })
        // A later partial write into a dirty page: payload, then zeros.
        for f in 1..<64 { p.memory.page(UInt32(f)).initializeMemory(as: UInt8.self, repeating: 0xee, count: 4096) }
        let data = [UInt8](repeating: 0x11, count: 1024)
        try data.withUnsafeBytes { _ = try p.front.submitWrite(sector: 8, from: $0, token: 2) }
        let writeFrame = p.front.segmentFrames[11]
        let page = UnsafeRawBufferPointer(start: p.memory.page(writeFrame), count: 4096)
        #expect(page[..<1024].allSatisfy { $0 == 0x11 })
        #expect(page[1024...].allSatisfy { $0 == 0 })
        // A partial read zeroes the tail beyond what it asks for.
        try p.front.submitRead(sector: 16, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<512]), token: 3)
        let partial = UnsafeRawBufferPointer(start: p.memory.page(p.front.segmentFrames[22]), count: 4096)
        #expect(partial[512...].allSatisfy { $0 == 0 })
    }

    /// Writes are granted read-only (GTF_readonly), reads writable; the backend's
    /// mapping check enforces it.
    @Test func writesAreGrantedReadOnly() throws {
        let p = try XenPair()
        let data = [UInt8](repeating: 1, count: 4096)
        try data.withUnsafeBytes { _ = try p.front.submitWrite(sector: 0, from: $0, token: 1) }
        let ref = p.front.segmentRefs[0]
        #expect(p.grantFlags(ref) == GrantLayout.permitAccess | GrantLayout.readOnly)
        #expect(
            throws: XenViolation.xenGrantNotGranted(ref: ref, flags: GrantLayout.permitAccess | GrantLayout.readOnly)
        ) {
            try p.back.mapper.map(ref, write: true)
        }
    }

    /// R1: scribbling the request slots and req_prod after posting changes nothing the
    /// frontend does: it publishes its private producer and completes from its shadow.
    @Test func scribbledRequestsAndProducerAreNeverReadBack() throws {
        let p = try XenPair()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        try p.front.submitRead(sector: 0, into: buffer, token: 42)
        _ = p.front.publish()
        // A malicious backend rewrites the request slot and req_prod.
        p.slot(0).initializeMemory(as: UInt8.self, repeating: 0xff, count: BlkifLayout.requestSize)
        SharedAccess.store32(p.ring + SharedRingLayout.requestProducer, 77)
        SharedAccess.store32(p.ring + SharedRingLayout.requestEvent, 0)
        p.writeResponse(slot: 0, id: 0, operation: 0, status: 0)
        p.setResponseProducer(1)
        #expect(try p.front.nextCompletion() == BlkCompletion(token: 42, id: 0, operation: .read, status: .okay))
        try p.front.submitFlush(token: 43)
        _ = p.front.publish()
        #expect(SharedAccess.load32(p.ring + SharedRingLayout.requestProducer) == 2)
        #expect(p.slot(1).load(fromByteOffset: 8, as: UInt64.self) == 0)  // id from the private free list
    }

    /// Notify decision uses the private old producer, not the shared one (the header's
    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY reads req_prod back).
    @Test func notifyDecisionIgnoresSharedProducer() throws {
        let p = try XenPair()
        try p.front.submitFlush(token: 1)
        // The backend asked for an event at request 1; it also scribbles req_prod.
        SharedAccess.store32(p.ring + SharedRingLayout.requestEvent, 1)
        SharedAccess.store32(p.ring + SharedRingLayout.requestProducer, 1)
        #expect(p.front.publish() == true)
        try p.front.submitFlush(token: 2)
        SharedAccess.store32(p.ring + SharedRingLayout.requestProducer, 0)
        #expect(p.front.publish() == false)  // req_event 1 already passed
    }

    /// A quarantined page never returns to the pool, even across later requests.
    @Test func quarantinedPageIsNeverReused() throws {
        let p = try XenPair(frameCount: 4)  // ring + 3 bounce pages
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
        defer { buffer.deallocate() }
        try p.front.submitRead(sector: 0, into: buffer, token: 1)
        _ = p.front.publish()
        p.back.hooks = XenBackendAdversary(.grantStillMapped)
        try p.serveAll()
        #expect(throws: (any Error).self) { try p.front.nextCompletion() }
        _ = p.front.failAll()
        #expect(p.front.availablePages == 2)
        #expect(p.front.quarantinedFrames == [1])
    }

    @Test func fullRingAndBounceSpaceAreTypedErrors() throws {
        let p = try XenPair(frameCount: 4)
        let big = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 * 4096, alignment: 8)
        defer { big.deallocate() }
        #expect(throws: BlkSubmitError.noBounceSpace) { try p.front.submitRead(sector: 0, into: big, token: 1) }
        #expect(throws: BlkSubmitError.invalidLength(100)) {
            try p.front.submitRead(sector: 0, into: UnsafeMutableRawBufferPointer(rebasing: big[0..<100]), token: 1)
        }
        for t in 0..<32 { try p.front.submitFlush(token: UInt64(t)) }
        #expect(throws: BlkSubmitError.full) { try p.front.submitFlush(token: 99) }
    }
}
