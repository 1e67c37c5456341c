import Adversary
import RingTestSupport
import SharedMemory
import Testing
@testable import XenRing

/// Backend attacks on the ring, seen by the hardened frontend (R2, R3, R6, R7). The test
/// plays the backend by hand; each attack must raise its exact violation, disable only
/// that device, and hand back exactly the in-flight tokens.
@Suite struct FrontendResponseAttackTests {
    /// Posts `n` one-page reads (tokens 100...) and publishes them.
    static func postReads(_ p: XenPair, _ n: Int, buffer: UnsafeMutableRawBufferPointer) throws -> [UInt64] {
        var tokens: [UInt64] = []
        for i in 0..<n {
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[(i * 4096)..<((i + 1) * 4096)])
            try p.front.submitRead(sector: UInt64(i * 8), into: slice, token: UInt64(100 + i))
            tokens.append(UInt64(100 + i))
        }
        _ = p.front.publish()
        return tokens
    }

    func withReads(_ n: Int, _ body: (XenPair, [UInt64], XenPair) throws -> Void) throws {
        let p = try XenPair()
        let other = try XenPair()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096 * max(1, n), alignment: 8)
        defer { buffer.deallocate() }
        let tokens = try Self.postReads(p, n, buffer: buffer)
        try body(p, tokens, other)
    }

    @Test func responseProducerJumpBeyondRingDisablesDevice() throws {
        try withReads(2) { p, tokens, other in
            p.setResponseProducer(33)
            let v = XenViolation.xenResponseProducerBeyondInFlight(consumer: 0, producer: 33, inFlight: 2)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func responseProducerBeyondInFlightDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.writeResponse(slot: 0, id: 0, operation: 0, status: 0)
            p.writeResponse(slot: 1, id: 0, operation: 0, status: 0)
            p.setResponseProducer(2)
            let v = XenViolation.xenResponseProducerBeyondInFlight(consumer: 0, producer: 2, inFlight: 1)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func responseProducerBackwardsDisablesDevice() throws {
        try withReads(2) { p, tokens, other in
            try p.serveAll()
            #expect(try p.front.nextCompletion()?.token == 100)
            #expect(try p.front.nextCompletion()?.token == 101)
            let more = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            defer { more.deallocate() }
            try p.front.submitRead(sector: 0, into: more, token: 7)
            _ = p.front.publish()
            p.setResponseProducer(1)
            let v = XenViolation.xenResponseProducerWentBackwards(consumer: 2, producer: 1)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: [7], other: other)
        }
    }

    @Test func responseIdOutOfRangeDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.writeResponse(slot: 0, id: 32, operation: 0, status: 0)
            p.setResponseProducer(1)
            let v = XenViolation.xenResponseIdOutOfRange(id: 32, ringSize: 32)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func responseIdHugeDoesNotTrap() throws {
        try withReads(1) { p, tokens, other in
            p.writeResponse(slot: 0, id: .max, operation: 0, status: 0)
            p.setResponseProducer(1)
            let v = XenViolation.xenResponseIdOutOfRange(id: .max, ringSize: 32)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func responseIdNotInFlightDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.writeResponse(slot: 0, id: 5, operation: 0, status: 0)
            p.setResponseProducer(1)
            let v = XenViolation.xenResponseIdNotInFlight(id: 5)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    /// The 2023 netback double-response case, within the in-flight count: the second
    /// response for id 0 names a request that already completed.
    @Test func duplicateResponseDisablesDevice() throws {
        try withReads(2) { p, tokens, other in
            p.writeResponse(slot: 0, id: 0, operation: 0, status: 0)
            p.writeResponse(slot: 1, id: 0, operation: 0, status: 0)
            p.setResponseProducer(2)
            #expect(try p.front.nextCompletion()?.token == 100)
            let v = XenViolation.xenResponseIdNotInFlight(id: 0)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: [101], other: other)
        }
    }

    /// The same through the adversarial backend: every response written twice.
    @Test func duplicateResponsesFromBackendDisableDevice() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.duplicateResponse)
            try p.serveAll()
            let v = XenViolation.xenResponseProducerBeyondInFlight(consumer: 0, producer: 2, inFlight: 1)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func wrongOperationDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.wrongOperation)
            try p.serveAll()
            let v = XenViolation.xenResponseOperationMismatch(id: 0, expected: 0, got: 1)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func unknownStatusDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.unknownStatus)
            try p.serveAll()
            let v = XenViolation.xenResponseStatusUnknown(id: 0, status: 7)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func responseIdOutOfRangeFromBackendDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.responseIdOutOfRange)
            try p.serveAll()
            let v = XenViolation.xenResponseIdOutOfRange(id: 1000, ringSize: 32)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func responseProducerJumpFromBackendDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.responseProducerJump)
            try p.serveAll()
            let v = XenViolation.xenResponseProducerBeyondInFlight(consumer: 0, producer: 1001, inFlight: 1)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    @Test func responseProducerBackwardsFromBackendDisablesDevice() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.responseProducerBackwards)
            try p.serveAll()
            let v = XenViolation.xenResponseProducerWentBackwards(consumer: 0, producer: 0 &- 3)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    /// R2: a response rewritten after rsp_prod moved is not re-read: the completion
    /// carries what was copied, and rewriting a consumed slot changes nothing.
    @Test func responseRewrittenAfterProducerMovedIsNotReread() throws {
        try withReads(2) { p, _, _ in
            p.writeResponse(slot: 0, id: 0, operation: 0, status: 0)
            p.setResponseProducer(1)
            let c = try p.front.nextCompletion()
            #expect(c?.token == 100 && c?.status == .okay)
            // Rewrite the consumed slot into something invalid: never looked at again.
            p.writeResponse(slot: 0, id: 77, operation: 9, status: 9)
            #expect(try p.front.nextCompletion() == nil)
            #expect(!p.front.isBroken)
            p.writeResponse(slot: 1, id: 1, operation: 0, status: -1)
            p.setResponseProducer(2)
            #expect(try p.front.nextCompletion() == BlkCompletion(token: 101, id: 1, operation: .read, status: .error))
        }
    }

    /// The adversarial backend rewrites the slot right after publishing: the frontend
    /// reads it after the rewrite here, so it sees (and rejects) only the rewritten value.
    @Test func responseRewrittenBeforeConsumptionIsRejectedWhole() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.rewriteAfterPublish)
            try p.serveAll()
            let v = XenViolation.xenResponseIdOutOfRange(id: 999, ringSize: 32)
            #expect(throws: v) { try p.front.nextCompletion() }
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    /// A racing backend flips the id between valid and invalid while the frontend
    /// consumes: each outcome is either the valid completion or the out-of-range
    /// violation — never a mix (the id checked is the id used).
    @Test func responseRacedDuringConsumptionIsEitherValidOrRejected() throws {
        for _ in 0..<50 {
            let p = try XenPair()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
            defer { buffer.deallocate() }
            _ = try Self.postReads(p, 1, buffer: buffer)
            p.writeResponse(slot: 0, id: 0, operation: 0, status: 0)
            let slot = UInt(bitPattern: p.slot(0))
            let racer = TestThread {
                guard let s = UnsafeMutableRawPointer(bitPattern: slot) else { return }
                for i in 0..<2000 { SharedAccess.store64(s, i & 1 == 0 ? 0 : 40) }
            }
            p.setResponseProducer(1)
            do {
                let c = try p.front.nextCompletion()
                #expect(c?.token == 100)
                #expect(!p.front.isBroken)
            } catch {
                #expect(error == .xenResponseIdOutOfRange(id: 40, ringSize: 32))
                #expect(p.front.failAll() == [100])
            }
            racer.join()
        }
    }

    /// Backend keeps the page mapped (GTF_writing) when it answers: try-end fails, the
    /// ref and the page are quarantined for good, the device is disabled, nothing traps.
    @Test func grantStillMappedAtCompletionQuarantinesPage() throws {
        try withReads(1) { p, tokens, other in
            let pages = p.front.availablePages
            p.back.hooks = XenBackendAdversary(.grantStillMapped)
            try p.serveAll()
            let v = XenViolation.xenGrantStillMapped(ref: 8, flags: GrantLayout.permitAccess | GrantLayout.writing)
            #expect(throws: v) { try p.front.nextCompletion() }
            #expect(p.issuer.quarantined == [8])
            #expect(p.front.quarantinedFrames.count == 1)
            #expect(p.front.availablePages == pages)  // the page never came back
            try expectDisabled(p, v, inFlight: tokens, other: other)
            #expect(p.front.availablePages == pages)
        }
    }

    /// Backend scribbles the grant flags: the page is quarantined and the device disabled.
    @Test func grantFlagsScribbledQuarantinesPage() throws {
        try withReads(1) { p, tokens, other in
            p.back.hooks = XenBackendAdversary(.grantFlagsScribbled)
            try p.serveAll()
            let v = XenViolation.xenGrantFlagsScribbled(ref: 8, expected: GrantLayout.permitAccess, found: 0x00e2)
            #expect(throws: v) { try p.front.nextCompletion() }
            #expect(p.issuer.quarantined == [8])
            try expectDisabled(p, v, inFlight: tokens, other: other)
        }
    }

    /// In-flight grants still mapped when the device is failed stay quarantined too.
    @Test func failAllQuarantinesGrantsStillMapped() throws {
        try withReads(1) { p, tokens, _ in
            // The backend maps the page (pin) and stops: then a violation arrives.
            _ = try p.back.mapper.map(8, write: true)
            p.setResponseProducer(5)
            #expect(throws: (any Error).self) { try p.front.nextCompletion() }
            #expect(p.front.failAll() == tokens)
            #expect(p.issuer.quarantined == [8])
        }
    }

    @Test func validResponsesRoundTrip() throws {
        let p = try XenPair()
        #expect(try p.roundTrip())
        #expect(try p.roundTrip(sector: 0, seed: 3))
        #expect(p.issuer.quarantined.isEmpty)
    }
}
