import SharedMemory
import Testing
@testable import XenRing

/// Counts the tx slots a frontend stores through its hook (and changes nothing).
final class CountingPoster: XenNetFrontendHooks {
    var posted = 0
    func willPostTx(_ slot: UnsafeMutableRawPointer, isExtra: Bool, frontend: NetFrontend) { posted += 1 }
}

/// `NetFrontend.submitBatch` (and the device's `submitBatch`): each frame posted exactly as
/// `submit` posts it, one-slot frames' resources counted once per run, and the batch stops
/// exactly where the ring, the ids, the bounce pages or a bad length stop it.
@Suite struct NetSubmitBatchTests {
    /// Frames of the given sizes (frame `k`'s byte `i` is `i * 3 + k`) and the buffer list
    /// `submitBatch` takes, alive for `body`.
    func withFrames<T>(
        _ sizes: [Int], _ body: (UnsafeBufferPointer<UnsafeRawBufferPointer>, [[UInt8]]) throws -> T
    ) rethrows -> T {
        let frames = sizes.enumerated().map { k, size in (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 3 &+ k) } }
        let storage = frames.map { bytes -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 8)
            b.copyBytes(from: bytes)
            return UnsafeMutableRawBufferPointer(rebasing: b[0..<bytes.count])
        }
        defer { for b in storage { UnsafeMutableRawBufferPointer(start: b.baseAddress, count: 1).deallocate() } }
        let list = storage.map { UnsafeRawBufferPointer($0) }
        return try list.withUnsafeBufferPointer { try body($0, frames) }
    }

    /// Every frame of a batch goes out as `submit` would send it: the honest backend gets
    /// the bytes in order, and the completions carry tokens `firstToken`, `firstToken + 1`, ...
    @Test func postsEveryFrameWithConsecutiveTokens() throws {
        let pair = try NetPair()
        let sizes = [60, 1500, 4096, 14, 9000, 61]  // 9000: a three-slot chain in the middle
        try withFrames(sizes) { list, frames in
            #expect(try pair.front.submitBatch(list, firstToken: 100) == sizes.count)
            #expect(pair.front.txFramesInFlight == sizes.count)
            #expect(pair.front.txSlotsInFlight == 5 + 3)
            _ = pair.front.publishTx()
            try pair.serveTx()
            #expect(pair.delivered == frames)
        }
        var completions: [NetTxCompletion] = []
        while let c = try pair.front.nextTxCompletion() { completions.append(c) }
        #expect(completions.map(\.token).sorted() == Array(100..<106))
        #expect(completions.allSatisfy { $0.status == .okay })
        #expect(pair.front.txFramesInFlight == 0 && pair.front.txSlotsInFlight == 0)
    }

    /// Four tx bounce pages: a batch of six posts four (the one-slot run counted once), the
    /// next call posts none and says so with 0, nothing is thrown and nothing breaks.
    @Test func stopsWhereTheBouncePagesRunOut() throws {
        let pair = try NetPair(frameCount: 2 + 4 + 4, rxPages: 4)
        #expect(pair.front.availableTxPages == 4)
        let posted = try withFrames([60, 60, 60, 60, 60, 60]) { list, _ in
            let first = try pair.front.submitBatch(list, firstToken: 1)
            return [first, try pair.front.submitBatch(UnsafeBufferPointer(rebasing: list[4...]), firstToken: 5)]
        }
        #expect(posted == [4, 0])
        #expect(pair.front.txFramesInFlight == 4 && pair.front.availableTxPages == 0)
        #expect(!pair.front.isBroken)
        _ = pair.front.publishTx()
        try pair.serveTx()
        var tokens: [UInt64] = []
        while let c = try pair.front.nextTxCompletion() { tokens.append(c.token) }
        #expect(tokens.sorted() == [1, 2, 3, 4])
    }

    /// The ring's 256 slots run out: a run of 254 one-slot frames is posted, the 3-slot
    /// chain after it does not fit and is not half posted, nor is anything after it.
    @Test func stopsWhereTheRingRunsOut() throws {
        let pair = try NetPair(frameCount: 2 + 4 + 300, rxPages: 4)
        let posted = try withFrames(Array(repeating: 60, count: 254) + [9000, 60]) { list, _ in
            let first = try pair.front.submitBatch(list, firstToken: 0)
            return [first, try pair.front.submitBatch(UnsafeBufferPointer(rebasing: list[254...]), firstToken: 254)]
        }
        #expect(posted == [254, 0])
        #expect(pair.front.txSlotsInFlight == 254 && pair.front.txFramesInFlight == 254 && !pair.front.isBroken)
        #expect(pair.front.availableTxPages == 2)
    }

    /// A frame of invalid length after good ones: the good ones are posted and counted, the
    /// next call (starting at the bad one) throws `.invalidLength`; nothing is disabled.
    @Test func stopsBeforeAnInvalidLength() throws {
        let pair = try NetPair()
        let first = try withFrames([60, 61, 0, 62]) { list, _ in
            let n = try pair.front.submitBatch(list, firstToken: 10)
            #expect(throws: NetSubmitError.invalidLength(0)) {
                try pair.front.submitBatch(UnsafeBufferPointer(rebasing: list[2...]), firstToken: 12)
            }
            return n
        }
        #expect(first == 2)
        let second = try withFrames([60, 65536]) { list, _ in try pair.front.submitBatch(list, firstToken: 12) }
        #expect(second == 1)
        #expect(pair.front.txFramesInFlight == 3 && !pair.front.isBroken)
    }

    /// With a hook set every frame takes `submit`'s path: the hook sees every slot.
    @Test func everySlotPassesTheHook() throws {
        let pair = try NetPair()
        let hook = CountingPoster()
        pair.front.hooks = hook
        let posted = try withFrames([60, 9000, 60]) { list, _ in try pair.front.submitBatch(list, firstToken: 0) }
        #expect(posted == 3 && hook.posted == 5)
    }

    /// A disabled frontend posts nothing: `.broken` with the violation.
    @Test func aDisabledFrontendThrowsBroken() throws {
        let pair = try NetPair()
        let v = pair.front.disable(.xenNetUnexpectedNullResponse(position: 0))
        _ = withFrames([60]) { list, _ in
            #expect(throws: NetSubmitError.broken(v)) { try pair.front.submitBatch(list, firstToken: 0) }
        }
        #expect(pair.front.txFramesInFlight == 0)
    }

    /// The tx completion fast path keeps the frame's worst status: a chain answered head
    /// last (OKAY on the head, after ERROR on its second slot) completes with ERROR.
    @Test func aChainAnsweredHeadLastKeepsItsWorstStatus() throws {
        let pair = try NetPair()
        try [UInt8](repeating: 1, count: 5000).withUnsafeBytes { try pair.front.submit(frame: $0, token: 7) }
        _ = pair.front.publishTx()
        pair.writeTxResponse(slot: 0, id: 1, status: NetStatus.error.rawValue)
        pair.writeTxResponse(slot: 1, id: 0, status: NetStatus.okay.rawValue)
        pair.setTxResponseProducer(2)
        #expect(try pair.front.nextTxCompletion() == NetTxCompletion(token: 7, status: .error))
        #expect(pair.front.txFramesInFlight == 0 && !pair.front.isBroken)
        #expect(try pair.roundTrip())
    }
}
