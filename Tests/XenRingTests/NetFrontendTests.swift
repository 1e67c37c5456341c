import SharedMemory
import Testing
@testable import XenRing

/// The honest paths of netfront against our netback, in process: frames of every size
/// both ways, multi-slot chains, GSO segments, pages zeroed before reuse.
@Suite struct NetFrontendTests {
    @Test(arguments: [14, 64, 1500, 4096, 4097, 9000, 65535])
    func framesRoundTripBothWays(size: Int) throws {
        let pair = try NetPair()
        for seed in 0..<3 { #expect(try pair.roundTrip(size: size, seed: UInt8(seed))) }
        #expect(pair.issuer.quarantined.isEmpty)
        #expect(pair.back.rejectedFrames == 0)
    }

    @Test func manyFramesInFlightCompleteWithTheirTokens() throws {
        let pair = try NetPair()
        let frames = (0..<40).map { n in (0..<(60 + n * 37)).map { UInt8(truncatingIfNeeded: $0 ^ n) } }
        for (n, f) in frames.enumerated() {
            try f.withUnsafeBytes { try pair.front.submit(frame: $0, token: UInt64(n)) }
        }
        #expect(pair.front.publishTx())
        try pair.serveTx()
        var tokens: [UInt64] = []
        while let c = try pair.front.nextTxCompletion() {
            #expect(c.status == .okay)
            tokens.append(c.token)
        }
        #expect(tokens == (0..<40).map { UInt64($0) })
        #expect(pair.delivered == frames)
    }

    @Test func gsoSegmentTravelsBothWays() throws {
        let pair = try NetPair()
        let data = [UInt8](repeating: 0x5a, count: 9000)
        let gso = NetGSO(type: .tcpv4, size: 1448)
        var seen: NetGSO?
        try data.withUnsafeBytes { try pair.front.submit(frame: $0, token: 1, gso: gso) }
        _ = pair.front.publishTx()
        _ = try pair.back.serveTx(budget: 8) { seen = $0.gso }
        _ = pair.back.publishResponses()
        #expect(seen == gso)
        #expect(try pair.front.nextTxCompletion() == NetTxCompletion(token: 1, status: .okay))
        pair.front.refillRx()
        _ = pair.front.publishRx()
        #expect(
            try data.withUnsafeBytes { try pair.back.send($0, gso: NetGSO(type: .tcpv6, size: 1400)) }
                == .sent(slots: 4))
        _ = pair.back.publishResponses()
        var buffer = [UInt8](repeating: 0, count: 65536)
        let frame = try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }
        #expect(frame?.gso == NetGSO(type: .tcpv6, size: 1400))
        #expect(frame?.length == 9000)
        #expect(Array(buffer[0..<9000]) == data)
    }

    /// R7: an rx page is zeroed before its first grant (whatever was in the memfd) and
    /// never written by us after that; a tx bounce page holds the frame and zeroes.
    @Test func bouncePagesAreZeroedOnReuse() throws {
        let pair = try NetPair(rxPages: 1)
        pair.memory.page(2).initializeMemory(as: UInt8.self, repeating: 0x77, count: 4096)
        pair.front.refillRx()
        _ = pair.front.publishRx()
        let ref = pair.rxRequestRef(0)
        let page = try pair.back.mapper.map(ref, write: true)
        #expect(UnsafeRawBufferPointer(start: page, count: 4096).allSatisfy { $0 == 0 })
        page.initializeMemory(as: UInt8.self, repeating: 0xee, count: 4096)
        pair.back.mapper.unmap(ref, write: true)
        pair.writeRxResponse(slot: 0, id: 0, status: 10)
        pair.setRxResponseProducer(1)
        var buffer = [UInt8](repeating: 0, count: 64)
        #expect(try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }?.length == 10)
        #expect(pair.front.refillRx() == 1)
        // Reposted: only what this backend wrote itself (0xee), nothing of ours.
        let again = try pair.back.mapper.map(pair.rxRequestRef(1), write: true)
        #expect(UnsafeRawBufferPointer(start: again, count: 4096).allSatisfy { $0 == 0xee })
        pair.back.mapper.unmap(pair.rxRequestRef(1), write: true)
        // tx: bytes past the frame are zero even where an earlier, longer frame was.
        try [UInt8](repeating: 0xab, count: 3000).withUnsafeBytes { try pair.front.submit(frame: $0, token: 1) }
        _ = pair.front.publishTx()
        try pair.serveTx()
        _ = try pair.front.nextTxCompletion()
        try [UInt8](repeating: 0xcd, count: 100).withUnsafeBytes { try pair.front.submit(frame: $0, token: 2) }
        let txPage = try pair.back.mapper.map(pair.txRequestRef(1), write: false)
        let bytes = UnsafeRawBufferPointer(start: txPage, count: 4096)
        #expect(bytes[0..<100].allSatisfy { $0 == 0xcd } && bytes[100...].allSatisfy { $0 == 0 })
        pair.back.mapper.unmap(pair.txRequestRef(1), write: false)
    }

    @Test func rxErrorStatusFailsTheFrameNotTheDevice() throws {
        let pair = try NetPair()
        pair.front.refillRx()
        pair.writeRxResponse(slot: 0, id: 0, status: NetStatus.dropped.rawValue)
        pair.setRxResponseProducer(1)
        var buffer = [UInt8](repeating: 0, count: 64)
        let frame = try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }
        #expect(frame?.status == .dropped && frame?.length == 0)
        #expect(!pair.front.isBroken)
    }

    @Test func tooLongFrameIsTruncatedToTheBuffer() throws {
        let pair = try NetPair()
        pair.front.refillRx()
        _ = pair.front.publishRx()
        _ = try [UInt8](repeating: 9, count: 5000).withUnsafeBytes { try pair.back.send($0) }
        _ = pair.back.publishResponses()
        var buffer = [UInt8](repeating: 0, count: 100)
        let frame = try buffer.withUnsafeMutableBytes { try pair.front.nextReceived(into: $0) }
        #expect(frame?.length == 100 && frame?.truncated == true && frame?.slots == 2)
    }

    @Test func submitRefusesWhatItCannotPost() throws {
        let pair = try NetPair(frameCount: 2 + 2 + 2)
        #expect(throws: NetSubmitError.invalidLength(0)) {
            try [UInt8]().withUnsafeBytes { try pair.front.submit(frame: $0, token: 1) }
        }
        #expect(throws: NetSubmitError.invalidLength(65536)) {
            try [UInt8](repeating: 0, count: 65536).withUnsafeBytes { try pair.front.submit(frame: $0, token: 1) }
        }
        #expect(throws: NetSubmitError.noBounceSpace) {
            try [UInt8](repeating: 0, count: 9000).withUnsafeBytes { try pair.front.submit(frame: $0, token: 1) }
        }
        #expect(!pair.front.isBroken)
    }
}
