import SharedMemory
import Testing
@testable import XenRing

/// A backend playing the worst moment: after the frontend loaded and validated an rx
/// response and before it copies the page, it rewrites the response slot (a longer
/// status) and the whole page, which it still has granted.
final class RewritingBackend: XenNetFrontendHooks {
    let pair: NetPair
    var calls = 0

    init(_ pair: NetPair) { self.pair = pair }

    func willCopyRx(position: UInt32, page: UnsafeMutableRawPointer) {
        calls += 1
        pair.writeRxResponse(slot: position, id: UInt16(position & 255), status: 4096)
        page.initializeMemory(as: UInt8.self, repeating: 0xff, count: SharedRingLayout.pageSize)
    }
}

/// Persistent rx grants (docs/xen.md "Netif", persistent rx grants): an rx page is granted
/// once, stays granted to this connection's backend across its posts, and is revoked only
/// by `failAll`. So the backend may write a page at any time: the frontend takes length and
/// offset from its one private copy of the response, copies the page once, never reads it
/// again, and the page never holds anything but zeroes and this backend's own bytes.
@Suite struct NetPersistentGrantTests {
    /// `rx` pages posted (nothing on tx).
    func posted(rx: Int) throws -> NetPair {
        let pair = try NetPair(rxPages: rx)
        #expect(pair.front.refillRx() == rx)
        _ = pair.front.publishRx()
        return pair
    }

    func flags(_ pair: NetPair, _ ref: UInt32) -> UInt16 {
        pair.memory.entries.load(fromByteOffset: Int(ref) * GrantLayout.entrySize, as: UInt16.self)
    }

    /// Each page keeps its ref and its grant (writable) across posts, pages come back
    /// first in, first out, and no ref is taken or given back per frame.
    @Test func rxPagesStayGrantedAcrossPosts() throws {
        let pair = try posted(rx: 4)
        let refs = (UInt32(0)..<4).map { pair.rxRequestRef($0) }
        #expect(refs == refs.sorted() && Set(refs).count == 4)
        let available = pair.issuer.available
        for n in 0..<4 {
            #expect(
                try [UInt8](repeating: UInt8(n), count: 64).withUnsafeBytes { try pair.back.send($0) }
                    == .sent(slots: 1))
        }
        _ = pair.back.publishResponses()
        var buffer = [UInt8](repeating: 0, count: 64)
        for n in 0..<4 {
            #expect(try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }?.length == 64)
            #expect(buffer == [UInt8](repeating: UInt8(n), count: 64))
        }
        // Answered and copied out: still granted, to the same backend, writable.
        for ref in refs { #expect(flags(pair, ref) == GrantLayout.permitAccess) }
        #expect(pair.front.refillRx() == 4)
        #expect((UInt32(4)..<8).map { pair.rxRequestRef($0) } == refs)
        #expect(pair.issuer.available == available)
        #expect(pair.issuer.quarantined.isEmpty && !pair.front.isBroken)
    }

    /// The hazard: the backend rewrites the response (status 4096) and the page (0xff)
    /// between the frontend's load of the response and its copy. The frame is delivered
    /// with the length of the private copy (64), read from the page once (so with the
    /// backend's new bytes: its own to choose), nothing is read again, and the page,
    /// re-posted, holds only the backend's bytes; the next honest frame arrives intact.
    @Test(arguments: ["batch", "single"])
    func backendRewritingTheGrantedPageChangesOnlyItsOwnBytes(_ path: String) throws {
        let pair = try posted(rx: 2)
        let ref = pair.rxRequestRef(0)  // read before the response overwrites the slot
        #expect(try [UInt8](repeating: 0xa1, count: 64).withUnsafeBytes { try pair.back.send($0) } == .sent(slots: 1))
        _ = pair.back.publishResponses()
        let hook = RewritingBackend(pair)
        pair.front.hooks = hook
        var buffer = [UInt8](repeating: 0, count: 8192)
        var frame: NetReceivedFrame?
        if path == "batch" {
            let results = UnsafeMutableBufferPointer<NetReceivedFrame>.allocate(capacity: 4)
            defer { results.deallocate() }
            let n = try buffer.withUnsafeMutableBytes {
                try pair.front.receiveBatch(into: $0, stride: 0, results: results)
            }
            #expect(n == 1)
            frame = n == 1 ? results[0] : nil
        } else {
            frame = try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }
        }
        #expect(hook.calls == 1)
        #expect(frame?.length == 64 && frame?.status == .okay && frame?.truncated == false)
        #expect(buffer[0..<64].allSatisfy { $0 == 0xff } && buffer[64...].allSatisfy { $0 == 0 })
        pair.front.hooks = nil
        // The rewritten slot is not read again.
        #expect(try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) } == nil)
        #expect(!pair.front.isBroken && pair.front.rxPosted == 1)
        // Re-posted (same ref): the page holds the backend's own bytes, nothing of ours.
        #expect(pair.front.refillRx() == 1)
        _ = pair.front.publishRx()
        #expect(pair.rxRequestRef(2) == ref)
        #expect(
            UnsafeRawBufferPointer(start: pair.memory.page(pair.memory.grantedFrame(ref)), count: 4096).allSatisfy {
                $0 == 0xff
            })
        // The next honest frame arrives whole, with its own length.
        let data = (0..<1500).map { UInt8(truncatingIfNeeded: $0) }
        #expect(try data.withUnsafeBytes { try pair.back.send($0) } == .sent(slots: 1))
        _ = pair.back.publishResponses()
        buffer = [UInt8](repeating: 0, count: 8192)
        #expect(try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }?.length == 1500)
        #expect(Array(buffer[0..<1500]) == data)
    }

    /// XSA-396 with persistent grants: a backend that keeps an rx page mapped is within
    /// its rights while the connection lives (the page only ever carries its own frames),
    /// so the frame is delivered and the device stays up; `failAll` revokes every rx grant,
    /// posted or pooled, and the one still mapped is quarantined, its page never reused.
    @Test func failAllRevokesEveryRxGrantAndQuarantinesOneStillMapped() throws {
        let pair = try posted(rx: 4)
        let refs = (UInt32(0)..<4).map { pair.rxRequestRef($0) }
        _ = try pair.back.mapper.map(refs[1], write: true)  // kept mapped
        pair.writeRxResponse(slot: 0, id: 0, status: 10)
        pair.writeRxResponse(slot: 1, id: 1, status: 10)
        pair.setRxResponseProducer(2)
        var buffer = [UInt8](repeating: 0, count: 64)
        #expect(try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }?.length == 10)
        #expect(try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }?.length == 10)
        #expect(!pair.front.isBroken && pair.issuer.quarantined.isEmpty)
        #expect(pair.front.failAll() == [])
        for (i, ref) in refs.enumerated() where i != 1 { #expect(flags(pair, ref) == 0) }
        let expected = XenViolation.xenGrantStillMapped(
            ref: refs[1], flags: GrantLayout.permitAccess | GrantLayout.writing)
        #expect(pair.front.violation == expected && pair.front.isBroken)
        #expect(pair.issuer.quarantined == [refs[1]])
        #expect(pair.front.quarantinedFrames == [pair.memory.grantedFrame(refs[1])])
        #expect(pair.front.rxFrames.count == 3)
        #expect(pair.front.refillRx() == 0)
    }

    /// A frontend that is not disabled (a timeout's `failAll`) grants its pages afresh on
    /// the next refill: revoked pages are granted again before they are posted.
    @Test func pagesRevokedByFailAllAreGrantedAgainBeforeReuse() throws {
        let pair = try posted(rx: 2)
        #expect(pair.front.failAll() == [])
        #expect(!pair.front.isBroken)
        for i in UInt32(0)..<2 { #expect(flags(pair, pair.rxRequestRef(i)) == 0) }
        #expect(pair.front.refillRx() == 2)
        for i in UInt32(2)..<4 { #expect(flags(pair, pair.rxRequestRef(i)) == GrantLayout.permitAccess) }
    }
}

/// Persistent tx grants (docs/xen.md "Netif", persistent tx grants): a tx page is granted
/// read-only once and stays granted to this connection's backend across frames; each
/// completion loads the entry's flags once (no compare-exchange) and quarantines a page
/// the backend still maps or whose flags it changed, as the per-frame revocation did;
/// `failAll` revokes every tx grant.
@Suite struct NetPersistentTxGrantTests {
    func flags(_ pair: NetPair, _ ref: UInt32) -> UInt16 {
        pair.memory.entries.load(fromByteOffset: Int(ref) * GrantLayout.entrySize, as: UInt16.self)
    }

    /// One frame of `size` bytes of `byte` submitted, served by the honest backend and
    /// completed; returns the ref its request carried.
    func echo(_ pair: NetPair, size: Int, byte: UInt8, index: UInt32) throws -> UInt32 {
        pair.delivered = []
        try [UInt8](repeating: byte, count: size).withUnsafeBytes { try pair.front.submit(frame: $0, token: 1) }
        _ = pair.front.publishTx()
        let ref = pair.txRequestRef(index)
        try pair.serveTx()
        #expect(try pair.front.nextTxCompletion() == NetTxCompletion(token: 1, status: .okay))
        return ref
    }

    /// A page keeps its ref and its read-only grant across frames; no ref is taken from
    /// or given back to the issuer per frame; the page holds the last frame and zeroes.
    @Test func txPagesStayGrantedAcrossFrames() throws {
        let pair = try NetPair()
        let first = try echo(pair, size: 1500, byte: 0xa1, index: 0)
        let readOnly = GrantLayout.permitAccess | GrantLayout.readOnly
        #expect(flags(pair, first) == readOnly)
        let available = pair.issuer.available
        let second = try echo(pair, size: 100, byte: 0xb2, index: 1)
        #expect(second == first)  // the same page (last in, first out), the same grant
        #expect(flags(pair, second) == readOnly)
        #expect(pair.issuer.available == available)
        #expect(pair.delivered == [[UInt8](repeating: 0xb2, count: 100)])
        let page = UnsafeRawBufferPointer(start: pair.memory.page(pair.memory.grantedFrame(first)), count: 4096)
        #expect(page[0..<100].allSatisfy { $0 == 0xb2 } && page[100...].allSatisfy { $0 == 0 })
        #expect(pair.issuer.quarantined.isEmpty && !pair.front.isBroken)
    }

    /// The backend leaves the page mapped when it answers: caught at that completion
    /// (xenGrantStillMapped, the flags found), the page quarantined and never reused.
    @Test func txPageStillMappedAtCompletionIsQuarantined() throws {
        let pair = try NetPair()
        let ref = try echo(pair, size: 60, byte: 1, index: 0)
        try [UInt8](repeating: 2, count: 60).withUnsafeBytes { try pair.front.submit(frame: $0, token: 2) }
        _ = pair.front.publishTx()
        #expect(pair.txRequestRef(1) == ref)
        _ = try pair.back.mapper.map(ref, write: false)  // kept mapped
        pair.writeTxResponse(slot: 1, id: pair.txSlot(1).load(fromByteOffset: 8, as: UInt16.self), status: 0)
        pair.setTxResponseProducer(2)
        let found = GrantLayout.permitAccess | GrantLayout.readOnly | GrantLayout.reading
        #expect(throws: XenViolation.xenGrantStillMapped(ref: ref, flags: found)) {
            try pair.front.nextTxCompletion()
        }
        #expect(pair.issuer.quarantined == [ref])
        #expect(pair.front.quarantinedFrames == [pair.memory.grantedFrame(ref)])
        #expect(pair.front.availableTxPages == 63)  // of 64: the page is out of the pool
        #expect(flags(pair, ref) == found)  // left alone: never revoked, never reused
        #expect(pair.front.failAll() == [2])
        #expect(flags(pair, ref) == found && pair.front.availableTxPages == 63)
    }

    /// The backend rewrote the entry's flags (here: the read-only bit cleared) before it
    /// answered: quarantined at completion (xenGrantFlagsScribbled).
    @Test func txGrantFlagsChangedByBackendAreQuarantinedAtCompletion() throws {
        let pair = try NetPair()
        let ref = try echo(pair, size: 60, byte: 1, index: 0)
        try [UInt8](repeating: 2, count: 60).withUnsafeBytes { try pair.front.submit(frame: $0, token: 2) }
        _ = pair.front.publishTx()
        pair.memory.entries.storeBytes(
            of: GrantLayout.permitAccess, toByteOffset: Int(ref) * GrantLayout.entrySize, as: UInt16.self)
        try pair.serveTx()
        let v = XenViolation.xenGrantFlagsScribbled(
            ref: ref, expected: GrantLayout.permitAccess | GrantLayout.readOnly, found: GrantLayout.permitAccess)
        #expect(throws: v) { try pair.front.nextTxCompletion() }
        #expect(pair.issuer.quarantined == [ref] && pair.front.violation == v)
    }

    /// `failAll` revokes the grant of every tx page, pooled or in flight; one the backend
    /// still maps is quarantined; a frontend not disabled grants its pages afresh.
    @Test func failAllRevokesEveryTxGrant() throws {
        let pair = try NetPair()
        _ = try echo(pair, size: 60, byte: 1, index: 0)
        for token in UInt64(2)...4 {
            try [UInt8](repeating: 2, count: 60).withUnsafeBytes { try pair.front.submit(frame: $0, token: token) }
        }
        _ = pair.front.publishTx()
        let inFlight = (UInt32(1)...3).map { pair.txRequestRef($0) }
        _ = try pair.back.mapper.map(inFlight[1], write: false)  // kept mapped
        let granted = (0..<512).compactMap { ref -> UInt32? in
            flags(pair, UInt32(ref)) & GrantLayout.readOnly != 0 ? UInt32(ref) : nil
        }
        #expect(Set(inFlight).isSubset(of: Set(granted)) && granted.count == 3)
        #expect(pair.front.failAll().sorted() == [2, 3, 4])
        for ref in granted where ref != inFlight[1] { #expect(flags(pair, ref) == 0) }
        let found = GrantLayout.permitAccess | GrantLayout.readOnly | GrantLayout.reading
        #expect(flags(pair, inFlight[1]) == found)
        #expect(pair.issuer.quarantined == [inFlight[1]])
        #expect(pair.front.violation == .xenGrantStillMapped(ref: inFlight[1], flags: found))
    }

    @Test func txPagesRevokedByFailAllAreGrantedAgainBeforeReuse() throws {
        let pair = try NetPair()
        let ref = try echo(pair, size: 60, byte: 1, index: 0)
        #expect(pair.front.failAll() == [])
        #expect(flags(pair, ref) == 0 && !pair.front.isBroken)
        let again = try echo(pair, size: 60, byte: 2, index: 1)
        #expect(flags(pair, again) == GrantLayout.permitAccess | GrantLayout.readOnly)
        #expect(pair.delivered == [[UInt8](repeating: 2, count: 60)])
    }
}
