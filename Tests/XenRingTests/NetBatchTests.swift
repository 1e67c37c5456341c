import SharedMemory
import Testing
@testable import XenRing

/// The batch paths of the hardened netfront (`receiveBatch`, `reapTxBatch`, and the
/// device's `pollBatch`/`reapTx` on them): every rule of the per-frame calls still holds,
/// and a bad response in the middle of a batch returns exactly the frames before it,
/// reads nothing after it, disables the device and makes the next call throw.
@Suite struct NetBatchTests {
    /// A pair with `rx` rx pages posted and three 60-byte frames (tokens 1, 2, 3, tx ids
    /// 0, 1, 2) in flight on tx.
    func posted(rx: Int = 8) throws -> NetPair {
        let pair = try NetPair(rxPages: rx)
        pair.front.refillRx()
        _ = pair.front.publishRx()
        for token in UInt64(1)...3 {
            try [UInt8](repeating: 1, count: 60).withUnsafeBytes { try pair.front.submit(frame: $0, token: token) }
        }
        _ = pair.front.publishTx()
        return pair
    }

    /// Fills the page posted at rx position `index` as the backend would (byte `i` is
    /// `i + seed`).
    func fillRxPage(_ pair: NetPair, _ index: UInt32, seed: UInt8) {
        let page = pair.memory.page(pair.memory.grantedFrame(pair.rxRequestRef(index)))
        for i in 0..<SharedRingLayout.pageSize {
            page.storeBytes(of: UInt8(truncatingIfNeeded: i) &+ seed, toByteOffset: i, as: UInt8.self)
        }
    }

    /// Runs `receiveBatch` into a 4 KiB buffer; returns the frames, the buffer, the count.
    func batch(_ pair: NetPair, stride: Int = 1024, max: Int = 16) throws(XenViolation) -> ([NetReceivedFrame], [UInt8])
    {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let results = UnsafeMutableBufferPointer<NetReceivedFrame>.allocate(capacity: max)
        defer { results.deallocate() }
        var outcome: Result<Int, XenViolation> = .success(0)
        buffer.withUnsafeMutableBytes { b in
            outcome = Result { () throws(XenViolation) in
                try pair.front.receiveBatch(into: b, stride: stride, results: results)
            }
        }
        let n = try outcome.get()
        return (Array(results[0..<n]), buffer)
    }

    @Test func receiveBatchDeliversEveryFrameAtItsPlace() throws {
        let pair = try posted()
        for (i, size) in [10, 20, 30, 1500].enumerated() {
            fillRxPage(pair, UInt32(i), seed: UInt8(i * 50))
            pair.writeRxResponse(slot: UInt32(i), id: UInt16(i), offset: UInt16(i), status: Int16(size))
        }
        pair.setRxResponseProducer(4)
        let (frames, buffer) = try batch(pair)
        #expect(frames.map(\.length) == [10, 20, 30, 1024])
        #expect(frames.map(\.truncated) == [false, false, false, true])
        #expect(frames.allSatisfy { $0.status == .okay && $0.slots == 1 && $0.gso == nil })
        for (i, length) in [10, 20, 30, 1024].enumerated() {
            let expected = (0..<length).map { UInt8(truncatingIfNeeded: $0 + i) &+ UInt8(i * 50) }
            #expect(Array(buffer[i * 1024..<i * 1024 + length]) == expected)
        }
        #expect(pair.front.rxPosted == 4)
        #expect(try batch(pair).0.isEmpty)
        // stride 0: every frame into the whole buffer, the last one stays.
        let next = try posted()
        fillRxPage(next, 0, seed: 1)
        fillRxPage(next, 1, seed: 9)
        next.writeRxResponse(slot: 0, id: 0, status: 100)
        next.writeRxResponse(slot: 1, id: 1, status: 2000)
        next.setRxResponseProducer(2)
        let (overwritten, whole) = try batch(next, stride: 0)
        #expect(overwritten.map(\.length) == [100, 2000])
        #expect(Array(whole[0..<2000]) == (0..<2000).map { UInt8(truncatingIfNeeded: $0) &+ 9 })
    }

    /// Frames the fast path does not take (more_data chains, extra info, a failed
    /// status) go through the general path in the same batch, with the same copy.
    @Test func receiveBatchMixesChainsExtrasAndFailedFrames() throws {
        let pair = try posted()
        pair.writeRxResponse(slot: 0, id: 0, status: 10)
        pair.writeRxResponse(slot: 1, id: 1, flags: NetFlags.rxMoreData, status: 100)
        pair.writeRxResponse(slot: 2, id: 2, status: 50)
        pair.writeRxResponse(slot: 3, id: 3, flags: NetFlags.rxExtraInfo, status: 60)
        pair.writeRxExtra(slot: 4, type: NetExtraType.gso.rawValue, gsoSize: 1448, gsoType: 1)
        pair.writeRxResponse(slot: 5, id: 5, status: NetStatus.dropped.rawValue)
        pair.writeRxResponse(slot: 6, id: 6, status: 70)
        pair.setRxResponseProducer(7)
        let (frames, _) = try batch(pair, stride: 512)
        #expect(frames.map(\.length) == [10, 150, 60, 0, 70])
        #expect(frames.map(\.slots) == [1, 2, 1, 1, 1])
        #expect(frames.map(\.status) == [.okay, .okay, .okay, .dropped, .okay])
        #expect(frames[2].gso == NetGSO(type: .tcpv4, size: 1448))
        #expect(pair.front.rxPosted == 1 && !pair.front.isBroken)
    }

    /// Places run out at the end of the buffer: the frame there is truncated, the ones
    /// after it get no bytes (and are still consumed, their pages back in the pool).
    @Test func receiveBatchCutsPlacesAtTheEndOfTheBuffer() throws {
        let pair = try posted()
        for i in 0..<3 { pair.writeRxResponse(slot: UInt32(i), id: UInt16(i), status: 3000) }
        pair.setRxResponseProducer(3)
        let (frames, _) = try batch(pair, stride: 3000)
        #expect(frames.map(\.length) == [3000, 1096, 0])
        #expect(frames.map(\.truncated) == [false, true, true])
        #expect(pair.front.rxPosted == 5)
        for i in 3..<5 { pair.writeRxResponse(slot: UInt32(i), id: UInt16(i), status: 3000) }
        pair.setRxResponseProducer(5)
        #expect(try batch(pair, stride: Int.max).0.map(\.length) == [3000, 0])  // no overflow
    }

    /// `results.count` bounds the batch; the rest stays for the next call.
    @Test func receiveBatchStopsAtItsCapacity() throws {
        let pair = try posted()
        for i in 0..<5 { pair.writeRxResponse(slot: UInt32(i), id: UInt16(i), status: Int16(10 + i)) }
        pair.setRxResponseProducer(5)
        #expect(try batch(pair, max: 3).0.map(\.length) == [10, 11, 12])
        #expect(try batch(pair, max: 3).0.map(\.length) == [13, 14])
    }

    /// One bad response at position 1 of a batch of three: frame 0 is returned, nothing
    /// after the bad response is read (position 2's page is still posted), the device
    /// is disabled with the exact violation, the next call throws it.
    @Test(arguments: [
        "id-out-of-range", "id-not-posted", "id-duplicated", "id-of-another-slot", "offset-past-page",
        "status-garbage", "bogus-extra-type", "chain-incomplete",
    ])
    func receiveBatchStopsAtABadResponse(_ attack: String) throws {
        let pair = try posted()
        fillRxPage(pair, 0, seed: 7)
        pair.writeRxResponse(slot: 0, id: 0, status: 10)
        var last: UInt32 = 2  // the first position after the bad response
        let expected: XenViolation
        switch attack {
        case "id-out-of-range":
            pair.writeRxResponse(slot: 1, id: 300, status: 10)
            expected = .xenResponseIdOutOfRange(id: 300, ringSize: 256)
        case "id-not-posted":
            pair.writeRxResponse(slot: 1, id: 200, status: 10)
            expected = .xenResponseIdNotInFlight(id: 200)
        case "id-duplicated":
            pair.writeRxResponse(slot: 1, id: 0, status: 10)
            expected = .xenResponseIdNotInFlight(id: 0)
        case "id-of-another-slot":
            pair.writeRxResponse(slot: 1, id: 5, status: 10)
            expected = .xenNetRxIdOutOfOrder(id: 5, expected: 1)
        case "offset-past-page":
            pair.writeRxResponse(slot: 1, id: 1, offset: 4090, status: 64)
            expected = .xenNetRxOffsetBeyondPage(id: 1, offset: 4090, size: 64)
        case "status-garbage":
            pair.writeRxResponse(slot: 1, id: 1, status: -77)
            expected = .xenNetStatusUnknown(ring: "rx", id: 1, status: -77)
        case "bogus-extra-type":
            pair.writeRxResponse(slot: 1, id: 1, flags: NetFlags.rxExtraInfo, status: 10)
            pair.writeRxExtra(slot: 2, type: 9)
            expected = .xenNetExtraInfoType(type: 9)
            last = 3
        default:  // chain-incomplete
            pair.writeRxResponse(slot: 1, id: 1, flags: NetFlags.rxMoreData, status: 10)
            expected = .xenNetChainIncomplete(slots: 1)
        }
        if attack != "chain-incomplete" { pair.writeRxResponse(slot: last, id: UInt16(last), status: 10) }
        pair.setRxResponseProducer(attack == "chain-incomplete" ? 2 : last + 1)
        let (frames, buffer) = try batch(pair)
        #expect(frames.map(\.length) == [10])
        #expect(Array(buffer[0..<10]) == (0..<10).map { UInt8($0) &+ 7 })
        #expect(pair.front.isBroken && pair.front.violation == expected)
        if attack != "chain-incomplete" {
            #expect(pair.front.rxResponseConsumer == last)
            #expect(pair.front.rxShadow[Int(last)].active)
        }
        #expect(throws: expected) { try batch(pair) }
        try expectNetDisabled(pair, expected, inFlight: [1, 2, 3], other: try NetPair())
    }

    /// rsp_prod past what is posted: the first call throws, nothing is delivered.
    @Test func receiveBatchRejectsAProducerRunAhead() throws {
        let pair = try posted(rx: 2)
        pair.writeRxResponse(slot: 0, id: 0, status: 10)
        pair.setRxResponseProducer(3)
        let expected = XenViolation.xenResponseProducerBeyondInFlight(consumer: 0, producer: 3, inFlight: 2)
        #expect(throws: expected) { try batch(pair) }
        #expect(pair.front.rxResponseConsumer == 0)
        try expectNetDisabled(pair, expected, inFlight: [1, 2, 3], other: try NetPair())
    }

    func reap(_ pair: NetPair, max: Int = 16) throws(XenViolation) -> [NetTxCompletion] {
        let results = UnsafeMutableBufferPointer<NetTxCompletion>.allocate(capacity: max)
        defer { results.deallocate() }
        let n = try pair.front.reapTxBatch(into: results)
        return Array(results[0..<n])
    }

    @Test func reapTxBatchReturnsEveryCompletion() throws {
        let pair = try posted()
        pair.writeTxResponse(slot: 0, id: 0, status: 0)
        pair.writeTxResponse(slot: 1, id: 1, status: NetStatus.dropped.rawValue)
        pair.setTxResponseProducer(2)
        #expect(
            try reap(pair) == [NetTxCompletion(token: 1, status: .okay), NetTxCompletion(token: 2, status: .dropped)])
        #expect(try reap(pair) == [])
        pair.writeTxResponse(slot: 2, id: 2, status: 0)
        pair.setTxResponseProducer(3)
        #expect(try reap(pair, max: 1) == [NetTxCompletion(token: 3, status: .okay)])
        #expect(pair.front.txFramesInFlight == 0)
    }

    /// A bad tx response in the middle: the completion before it is returned, the one
    /// after it is not read, the next call throws; tokens 2 and 3 are failed.
    @Test(arguments: ["status-garbage", "id-not-in-flight", "grant-kept-mapped"])
    func reapTxBatchStopsAtABadResponse(_ attack: String) throws {
        let pair = try posted()
        pair.writeTxResponse(slot: 0, id: 0, status: 0)
        let expected: XenViolation
        switch attack {
        case "status-garbage":
            pair.writeTxResponse(slot: 1, id: 1, status: 77)
            expected = .xenNetStatusUnknown(ring: "tx", id: 1, status: 77)
        case "id-not-in-flight":
            pair.writeTxResponse(slot: 1, id: 0, status: 0)
            expected = .xenResponseIdNotInFlight(id: 0)
        default:
            let ref = pair.txRequestRef(1)
            _ = try pair.back.mapper.map(ref, write: false)
            pair.writeTxResponse(slot: 1, id: 1, status: 0)
            expected = .xenGrantStillMapped(
                ref: ref, flags: GrantLayout.permitAccess | GrantLayout.readOnly | GrantLayout.reading)
        }
        pair.writeTxResponse(slot: 2, id: 2, status: 0)
        pair.setTxResponseProducer(3)
        #expect(try reap(pair) == [NetTxCompletion(token: 1, status: .okay)])
        #expect(pair.front.isBroken && pair.front.violation == expected)
        #expect(pair.front.txResponseConsumer == 2)
        #expect(throws: expected) { try reap(pair) }
        try expectNetDisabled(pair, expected, inFlight: [2, 3], other: try NetPair())
    }

    /// The device's batch calls against a real netback connection: frames echoed and
    /// counted through `pollBatch` and the batched `reapTx`.
    @Test func deviceEchoesThroughTheBatchCalls() throws {
        let (devices, backend) = try connectedNet()
        let device = devices[0]
        defer {
            device.disconnect()
            backend.join()
        }
        let results = UnsafeMutableBufferPointer<NetReceivedFrame>.allocate(capacity: 8)
        defer { results.deallocate() }
        var buffer = [UInt8](repeating: 0, count: 8 * 2048)
        var sent: [[UInt8]] = []
        for i in 0..<20 {
            let frame = ethernet(
                dst: [0, 0x16, 0x3e, 0, 0, 1], src: [2, 0, 0, 0, 0, 1], payload: 100 + i * 50, seed: i)
            try frame.withUnsafeBytes { try device.submit($0, token: UInt64(i)) }
            sent.append(frame)
        }
        device.kick()
        var received: [[UInt8]] = []
        let deadline = Deadline.after(seconds: 10)
        while received.count < sent.count {
            try device.reapTx()
            let n = try buffer.withUnsafeMutableBytes { try device.pollBatch(into: $0, stride: 2048, results: results) }
            #expect(n <= 8)
            for i in 0..<n { received.append(Array(buffer[i * 2048..<i * 2048 + results[i].length])) }
            device.kick()
            if n == 0 { try device.waitForWork(until: deadline) }
        }
        try device.reapTx()
        #expect(received == sent)
        #expect(device.txCompleted == 20 && device.txFailed == 0)
    }
}
