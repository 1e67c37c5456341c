import RingTestSupport
import SharedMemory
import Testing
@testable import XenRing

/// `XenNetFrontendDevice.exchange`, the loop pass that reaps tx completions, posts and
/// kicks, and only then copies the received frames out (the backend works meanwhile),
/// against a real netback connection on its own thread.
@Suite struct NetExchangeTests {
    /// `count` frames of 64 bytes (one slot each), the hostile tests' traffic.
    func smallFrames(_ count: Int) -> [[UInt8]] {
        (0..<count).map { ethernet(dst: [0, 0x16, 0x3e, 0, 0, 1], src: [2, 0, 0, 0, 0, 1], payload: 50, seed: $0) }
    }

    /// Frames of many sizes (one slot and chains), `count` of them.
    func frames(_ count: Int) -> [[UInt8]] {
        (0..<count).map { i in
            ethernet(dst: [0, 0x16, 0x3e, 0, 0, 1], src: [2, 0, 0, 0, 0, 1], payload: (i * 379) % 9000 + 46, seed: i)
        }
    }

    /// Runs exchange passes (at most `limit` frames in flight) until every frame came back
    /// or a call throws; returns the frames received in order, how many passes both posted
    /// and received, the error if one was thrown, and how many frames the calls posted.
    func run(_ device: XenNetFrontendDevice, _ sent: [[UInt8]], limit: Int = 8) -> (
        received: [[UInt8]], overlapped: Int, error: XenNetError?, posted: Int
    ) {
        let stride = 9100
        let results = UnsafeMutableBufferPointer<NetReceivedFrame>.allocate(capacity: 4)
        defer { results.deallocate() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 * stride, alignment: 64)
        defer { buffer.deallocate() }
        let pointers = UnsafeMutableBufferPointer<UnsafeRawBufferPointer>.allocate(capacity: sent.count)
        defer { pointers.deallocate() }
        let storage = sent.map { frame in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: frame.count, alignment: 16)
            frame.withUnsafeBytes { b.copyMemory(from: $0) }
            return b
        }
        defer { for b in storage { b.deallocate() } }
        for (i, b) in storage.enumerated() { pointers[i] = UnsafeRawBufferPointer(b) }
        var received: [[UInt8]] = []
        var next = 0
        var overlapped = 0
        let deadline = Deadline.after(seconds: 20)
        do throws(XenNetError) {
            while received.count < sent.count {
                let pass = try device.exchange(
                    sending: UnsafeBufferPointer(rebasing: pointers[next...]), firstToken: UInt64(next),
                    inFlightLimit: limit, into: buffer, stride: stride, results: results)
                #expect(device.front.txFramesInFlight <= limit)
                next += pass.sent
                if pass.sent > 0 && pass.received > 0 { overlapped += 1 }
                for i in 0..<pass.received {
                    let f = results[i]
                    #expect(f.status == .okay && !f.truncated)
                    received.append(Array(buffer[i * stride..<i * stride + f.length]))
                }
                if !pass.progressed { try device.waitForWork(until: deadline) }
            }
            try device.reapTx()
        } catch { return (received, overlapped, error, next) }
        return (received, overlapped, nil, next)
    }

    /// Every frame comes back byte for byte and in order; passes post and receive in the
    /// same call (the overlapped phase happens); nothing is left in flight or failed.
    @Test func exchangeEchoesEveryFrameInOrder() throws {
        let (devices, backend) = try connectedNet()
        let device = devices[0]
        defer {
            device.disconnect()
            backend.join()
        }
        let sent = frames(300)
        let (received, overlapped, error, _) = run(device, sent)
        #expect(error == nil)
        #expect(received == sent)
        #expect(overlapped > 0)
        #expect(device.txCompleted == 300 && device.txFailed == 0 && device.failedTokens.isEmpty)
        #expect(device.front.txFramesInFlight == 0)
    }

    /// Plays the backend writing the page of the response being copied out: at each copy,
    /// no rx request visible to the backend after that response names the page's grant.
    /// A page is posted again only after its frame was copied out (R7), although the kick
    /// that posts pages comes before the copy-out.
    final class RepostWatch: XenNetFrontendHooks {
        let device: () -> XenNetFrontendDevice?
        var copies = 0
        var repostedWhileCopying = 0

        init(_ device: @escaping () -> XenNetFrontendDevice?) { self.device = device }

        func willCopyRx(position: UInt32, page: UnsafeMutableRawPointer) {
            guard let device = device() else { return }
            copies += 1
            let memory = device.front.memory.grants
            let frame = (page - memory.page(0)) / SharedRingLayout.pageSize
            let ref = device.front.pageRef[frame]
            let ring = memory.page(device.front.memory.rxRingFrame)
            let producer = SharedAccess.load32Acquire(ring + SharedRingLayout.requestProducer)
            var q = position &+ 1
            while q != producer {
                let slot = ring + SharedRingLayout.headerSize + Int(q & 255) * NetifLayout.rxSlotSize
                if SharedAccess.load32(slot + 4) == ref { repostedWhileCopying += 1 }
                q &+= 1
            }
        }
    }

    @Test func exchangeNeverRepostsAPageBeforeItsFrameIsCopiedOut() throws {
        let (devices, backend) = try connectedNet()
        let device = devices[0]
        defer {
            device.disconnect()
            backend.join()
        }
        let watch = RepostWatch { [weak device] in device }
        device.front.hooks = watch
        let sent = frames(200)
        let (received, _, error, _) = run(device, sent, limit: 32)
        #expect(error == nil && received == sent)
        #expect(watch.copies >= 200)
        #expect(watch.repostedWhileCopying == 0)
    }

    /// The backend answers the 20th frame's rx slot with `offset + size` past the page:
    /// the call that meets it returns the frames before it (or throws if it is the first
    /// of its batch), the next call throws the exact violation, and nothing is lost: the
    /// 19 frames before it came back byte for byte, and every frame posted was either
    /// completed or handed back in `failedTokens`.
    final class BadRxOffset: XenNetBackendHooks {
        var responses = 0

        func willRespondRx(_ response: inout NetRxResponseFields) -> Int {
            responses += 1
            if responses == 20 { response.offset = 4090 }
            return 1
        }
    }

    @Test func hostileRxResponseDuringTheOverlapIsTypedAndLosesNothing() throws {
        let (devices, backend) = try connectedNet(hooks: BadRxOffset())
        let device = devices[0]
        defer {
            device.disconnect()
            backend.join()
        }
        let sent = smallFrames(100)
        let (received, _, error, posted) = run(device, sent, limit: 16)
        let expected = XenViolation.xenNetRxOffsetBeyondPage(id: 19, offset: 4090, size: 64)
        #expect(error == .broken(expected))
        #expect(device.violation == expected)
        #expect(received == Array(sent.prefix(19)))
        let failed = device.failedTokens
        #expect(Set(failed).count == failed.count)
        // Tokens are 0..<posted in order: those completed, then those failed, none missing.
        #expect(posted >= 20)
        #expect(failed.sorted() == (device.txCompleted..<posted).map { UInt64($0) })
        #expect(throws: XenNetError.broken(expected)) {
            try device.exchange(
                sending: UnsafeBufferPointer(start: nil, count: 0), firstToken: 0, inFlightLimit: 1,
                into: UnsafeMutableRawBufferPointer(start: nil, count: 0), stride: 0,
                results: UnsafeMutableBufferPointer(start: nil, count: 0))
        }
    }

    /// The backend answers the 20th frame's tx slot with status 77: the pass that meets it
    /// throws the exact violation before posting anything (R6: nothing more is read from
    /// that backend, echoes it published in the same batch included), and nothing is lost:
    /// the frames received before it are byte for byte the first ones sent, in order, the 19
    /// completions before it are counted, and every other frame posted is handed back in
    /// `failedTokens`.
    final class BadTxStatus: XenNetBackendHooks {
        var responses = 0
        var badId: UInt16?

        func willRespondTx(_ response: inout NetTxResponseFields) -> Int {
            responses += 1
            if responses == 20 {
                badId = response.id
                response.status = 77
            }
            return 1
        }
    }

    @Test func hostileTxCompletionIsTypedAndLosesNothing() throws {
        let hooks = BadTxStatus()
        let (devices, backend) = try connectedNet(hooks: hooks)
        let device = devices[0]
        defer {
            device.disconnect()
            backend.join()
        }
        let sent = smallFrames(100)
        let (received, _, error, posted) = run(device, sent, limit: 16)
        let id = try #require(hooks.badId)
        let expected = XenViolation.xenNetStatusUnknown(ring: "tx", id: id, status: 77)
        #expect(error == .broken(expected))
        #expect(device.violation == expected)
        #expect(received.count < sent.count && received == Array(sent.prefix(received.count)))
        let failed = device.failedTokens
        #expect(device.txCompleted == 19)
        #expect(posted >= 20)
        #expect(failed.sorted() == (19..<posted).map { UInt64($0) })
    }
}
