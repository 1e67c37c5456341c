import CXenPeer
import RingTestSupport
import SharedMemory
import Testing
@testable import XenRing

/// netif compatibility with a real reference: the C peer in Tests/CXenPeer/netpeer.c is
/// built only on libxen-dev's ring.h/netif.h macros. Our netfront drives its loopback
/// netback, and our netback serves its netfront; frames are checked byte for byte both
/// ways.
@Suite struct NetCReferencePeerTests {
    static let sizes: [UInt32] = [60, 64, 1500, 4096, 4097, 9000, 14, 65535, 1514]

    /// Frame `n` of `size` bytes as the C peer builds it: byte i = (i * 7 + n) & 0xff.
    static func pattern(_ n: Int, size: Int) -> [UInt8] {
        (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ n) }
    }

    struct Shared {
        let pair: NetPair
        let toBack: Notifier
        let toFront: Notifier
        init() throws {
            pair = try NetPair()
            toBack = try Notifier()
            toFront = try Notifier()
        }
        func env(asBackend: Bool) -> cxen_net_env {
            cxen_net_env(
                tx_sring: pair.txRing, rx_sring: pair.rxRing, gnttab: pair.table.base, gnttab_entries: 512,
                frames: pair.frames.base, nr_frames: 130,
                evt_to_peer: asBackend ? toFront.fileDescriptor : toBack.fileDescriptor,
                evt_from_peer: asBackend ? toBack.fileDescriptor : toFront.fileDescriptor)
        }
    }

    /// Our hardened netfront against the C loopback netback: each frame goes out on tx,
    /// comes back on rx, and equals what was sent.
    @Test func hardenedNetfrontDrivesCNetback() throws {
        let s = try Shared()
        let env = UnsafeSendable(s.env(asBackend: true))
        let count = 3 * Self.sizes.count
        let echoed = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        defer { echoed.deallocate() }
        echoed.initialize(to: 0)
        let echoedAddress = UInt(bitPattern: echoed)
        let thread = TestThread {
            var e = env.value
            let n = cxen_net_back_loopback(&e, UInt64(count), 5000)
            UnsafeMutablePointer<Int>(bitPattern: echoedAddress)?.pointee = n
        }
        let events = EventChannel(incoming: s.toFront, outgoing: s.toBack)
        let front = s.pair.front
        var buffer = [UInt8](repeating: 0, count: 65536)
        for n in 0..<count {
            let data = Self.pattern(n, size: Int(Self.sizes[n % Self.sizes.count]))
            try data.withUnsafeBytes { try front.submit(frame: $0, token: UInt64(n)) }
            front.refillRx()
            if front.publishRx() { events.notify() }
            if front.publishTx() { events.notify() }
            var completion: NetTxCompletion?
            var frame: NetReceivedFrame?
            let deadline = Deadline.after(seconds: 5)
            while completion == nil || frame == nil {
                if completion == nil, let c = try front.nextTxCompletion() {
                    completion = c
                    continue
                }
                if frame == nil, let f = try buffer.withUnsafeMutableBytes({ try front.nextReceived(into: $0) }) {
                    frame = f
                    continue
                }
                if front.enableNotifications() { continue }
                #expect(events.wait(until: deadline))
                if deadline.hasPassed { throw XenViolation.deadlineExceeded(milliseconds: 5000) }
            }
            #expect(completion == NetTxCompletion(token: UInt64(n), status: .okay))
            #expect(frame?.status == .okay && frame?.length == data.count)
            #expect(Array(buffer[0..<data.count]) == data)
        }
        thread.join()
        #expect(echoed.pointee == count)
        #expect(s.pair.issuer.quarantined.isEmpty)
        #expect(!front.isBroken)
    }

    /// The C netfront against our hardened netback in loopback: every frame it sends is
    /// delivered to us byte for byte and comes back to it byte for byte (it checks).
    @Test func cNetfrontIsServedByHardenedNetback() throws {
        let s = try Shared()
        let env = UnsafeSendable(s.env(asBackend: false))
        let count = 3 * Self.sizes.count
        let result = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        defer { result.deallocate() }
        result.initialize(to: 0)
        let resultAddress = UInt(bitPattern: result)
        let thread = TestThread {
            var e = env.value
            let n = Self.sizes.withUnsafeBufferPointer {
                cxen_net_front_echo(&e, 100, 2, 16, UInt64(count), $0.baseAddress, UInt32($0.count), 5000)
            }
            UnsafeMutablePointer<Int>(bitPattern: resultAddress)?.pointee = n
        }
        let back = s.pair.back
        let events = EventChannel(incoming: s.toBack, outgoing: s.toFront)
        var received: [[UInt8]] = []
        var pending: [[UInt8]] = []
        let deadline = Deadline.after(seconds: 10)
        while received.count < count || !pending.isEmpty, !deadline.hasPassed {
            let n = try back.serveTx(budget: 32) { frame in
                received.append(Array(frame.bytes))
                pending.append(Array(frame.bytes))
            }
            var sent = 0
            while let next = pending.first,
                case .sent = try next.withUnsafeBytes({ try back.send($0) })
            {
                pending.removeFirst()
                sent += 1
            }
            if back.publishResponses() { events.notify() }
            if n > 0 || sent > 0 { continue }
            if back.enableNotifications() { continue }
            _ = events.wait(until: .after(seconds: 1))
        }
        thread.join()
        #expect(result.pointee == count)
        #expect(received.count == count)
        for (n, frame) in received.enumerated() {
            #expect(frame == Self.pattern(n, size: Int(Self.sizes[n % Self.sizes.count])))
        }
        #expect(back.rejectedFrames == 0)
    }
}
