import Foundation
import SharedMemory
import Synchronization
import Testing
import VhostUser
import VirtioNet

/// A vhost-user-net back-end that is only a script: it answers every request the way
/// DPDK's net_vhost does (no config space, CTRL_VQ and MQ offered, REPLY_ACK and MQ
/// protocol features), except that GET_QUEUE_NUM answers `queueNum`. It serves no ring;
/// it records what the driver asked, closes every descriptor it is sent, and notes when
/// the driver's end of the socket closes.
final class ScriptedNetBackEnd: @unchecked Sendable {
    typealias F = NetProtocol.Feature
    static let dpdkFeatures: UInt64 =
        FeatureBits.version1 | FeatureBits.protocolFeatures | FeatureBits.ringEventIndex | F.mergeableRxBuffers
        | F.ctrlVQ | F.ctrlRx | F.mq | F.guestAnnounce | F.status | F.mac

    let queueNum: UInt64
    let requests = Mutex<[(request: Request?, payload: [UInt8])]>([])
    let sawEOF = Atomic<Bool>(false)
    let done = DispatchSemaphore(value: 0)

    init(queueNum: UInt64) { self.queueNum = queueNum }

    /// Serves `channel` on a thread of its own until the driver closes it (or 10 s pass).
    func serve(_ channel: UnixChannel) {
        Thread.detachNewThread { self.loop(channel) }
    }

    private func loop(_ channel: UnixChannel) {
        let messages = MessageChannel(channel)
        let deadline = Deadline.after(seconds: 10)
        while true {
            let m: Message
            do {
                m = try messages.receive(until: deadline, maxDescriptors: UnixChannel.maximumDescriptors)
            } catch {
                if case .channel(.closed) = error { sawEOF.store(true, ordering: .releasing) }
                break
            }
            m.closeDescriptors()
            requests.withLock { $0.append((m.request, m.payload)) }
            guard let request = m.request, let answer = answer(to: request, m) else { continue }
            let reply = Message(request, flags: HeaderFlags.version | HeaderFlags.reply, payload: answer)
            do { try messages.send(reply, until: deadline) } catch { break }
        }
        done.signal()
    }

    private func answer(to request: Request, _ m: Message) -> [UInt8]? {
        switch request {
        case .getFeatures: return U64Payload(Self.dpdkFeatures).encoded
        case .getProtocolFeatures: return U64Payload(ProtocolFeatures([.replyAck, .multiQueue]).rawValue).encoded
        case .getQueueNum: return U64Payload(queueNum).encoded
        case .getVringBase:
            let index: UInt32 = (try? VringState.decode(m.payload))?.index ?? 0
            return VringState(index: index, num: 0).encoded
        default: return m.header.needsReply ? U64Payload(0).encoded : nil
        }
    }

    /// Waits until the serving thread has ended; true if it saw the driver close its end.
    func driverClosed(seconds: Double = 10) -> Bool {
        done.wait(timeout: .now() + seconds) == .success && sawEOF.load(ordering: .acquiring)
    }

    /// The queue indexes of every request of `kind` (SET_VRING_NUM, SET_VRING_ENABLE, ...).
    func indexes(of kind: Request) -> [UInt32] {
        requests.withLock { $0.filter { $0.request == kind }.compactMap { try? VringState.decode($0.payload).index } }
    }

    /// SET_VRING_ENABLE requests as (index, enabled).
    var enables: [(UInt32, Bool)] {
        requests.withLock {
            $0.filter { $0.request == .setVringEnable }.compactMap { r in
                (try? VringState.decode(r.payload)).map { ($0.index, $0.num == 1) }
            }
        }
    }

    /// What SET_FEATURES acked.
    var acked: UInt64? {
        requests.withLock {
            $0.first { $0.request == .setFeatures }.flatMap { try? U64Payload.decode($0.payload).value }
        }
    }
}

/// GET_QUEUE_NUM is the back-end's word: a virtio-net driver takes its queue-pair count
/// from it when the back-end has no config space (DPDK's vhost), so it is bounded like
/// max_virtqueue_pairs (1...0x8000). Out of range: the exact typed error, the socket
/// closed. Above what we asked for: clamped (DPDK 22.11 answers 128 whatever its
/// queues= says), exactly the pairs we asked for set up and enabled, nothing more.
@Suite struct QueueNumTests {
    static func options(pairs: Int) -> VirtioNetDriver.Options {
        var o = VirtioNetDriver.Options()
        o.queuePairs = pairs
        o.queueSize = 16
        o.controlQueue = false  // DPDK's vhost: the control queue stays ours
        o.controlTimeout = 2
        o.acceptTimeout = 10
        return o
    }

    /// Connects our driver to the script over a socket pair, or (listen) lets the script
    /// connect to our listening driver as DPDK's `client=1` does.
    static func run(_ script: ScriptedNetBackEnd, pairs: Int, listen: Bool) throws -> Result<
        VirtioNetDriver, NetError
    > {
        if listen {
            let (dir, socket) = try NetListenTests.socketPath()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let listening = NetListenTests.Listening(socket: socket, options: options(pairs: pairs))
            let peer = try #require(NetListenTests.connectWhenListening(socket))
            script.serve(peer)
            return try #require(listening.wait())
        }
        let (ours, theirs) = try UnixChannel.pair()
        script.serve(theirs)
        do throws(NetError) {
            return .success(try VirtioNetDriver.connect(channel: ours, options: options(pairs: pairs)))
        } catch {
            return .failure(error)
        }
    }

    @Test(arguments: [UInt64(0), 65535, 0x8001, UInt64.max], [false, true])
    func getQueueNumOutOfRangeIsRefusedAndTheSocketClosed(queueNum: UInt64, listen: Bool) throws {
        let script = ScriptedNetBackEnd(queueNum: queueNum)
        let result = try Self.run(script, pairs: 2, listen: listen)
        guard case .failure(let error) = result else {
            Issue.record("connected with GET_QUEUE_NUM \(queueNum)")
            return
        }
        #expect(error == .deviceViolation(.queueCountInvalid(reported: queueNum)))
        #expect(error.rule == .r3)
        #expect(script.driverClosed(), "the driver's descriptor of the socket is closed")
        // Refused at the handshake: no memory, ring or eventfd was ever offered.
        #expect(script.requests.withLock { $0.last?.request } == .getQueueNum)
    }

    /// 0x8000 is the largest virtio-net allows, and DPDK 22.11's 128 is above what we ask:
    /// both clamped to the 2 pairs asked for; rings 0...3 set up, then enabled, nothing else
    /// (no control queue, no command), CTRL_VQ acked only for MQ.
    @Test(arguments: [UInt64(128), 0x8000], [false, true])
    func getQueueNumAboveWhatWeAskedIsClampedToThePairsAsked(queueNum: UInt64, listen: Bool) throws {
        let script = ScriptedNetBackEnd(queueNum: queueNum)
        let net = try Self.run(script, pairs: 2, listen: listen).get()
        #expect(net.queuePairCount == 2)
        #expect(net.info.queuePairs == 2)
        #expect(net.info.maximumQueuePairs == Int(queueNum))
        #expect(net.info.controlQueueIsPrivate && !net.info.hasControlQueue)
        #expect(script.indexes(of: .setVringNum) == [0, 1, 2, 3])
        #expect(script.indexes(of: .setVringKick) == [0, 1, 2, 3])
        let enables = script.enables
        #expect(enables.map(\.0) == [0, 1, 2, 3] && enables.allSatisfy(\.1))
        // Every ring is set up before the first is enabled.
        let order = script.requests.withLock { $0.map(\.request) }
        let lastSetUp = try #require(order.lastIndex(of: .setVringCall))
        let firstEnable = try #require(order.firstIndex(of: .setVringEnable))
        #expect(lastSetUp < firstEnable)
        typealias F = NetProtocol.Feature
        let acked = try #require(script.acked)
        #expect(acked & (F.mq | F.ctrlVQ) == F.mq | F.ctrlVQ)
        #expect(acked & (F.ctrlRx | F.guestAnnounce | F.status | F.mac) == 0, "nothing that needs a config or commands")
        #expect(throws: NetError.unsupported("control commands (the control queue is kept from this back-end)")) {
            try net.setPromiscuous(true)
        }
        net.close()
        #expect(script.indexes(of: .getVringBase) == [0, 1, 2, 3])
        #expect(script.driverClosed())
    }

    /// A back-end that can do one pair: one pair, MQ not acked, the control queue not
    /// acked either (nothing needs it).
    @Test func getQueueNumOfOneGivesOnePairWithoutMQ() throws {
        let script = ScriptedNetBackEnd(queueNum: 1)
        let net = try Self.run(script, pairs: 2, listen: false).get()
        #expect(net.queuePairCount == 1)
        #expect(!net.info.controlQueueIsPrivate)
        #expect(script.indexes(of: .setVringNum) == [0, 1])
        typealias F = NetProtocol.Feature
        #expect((script.acked ?? 0) & (F.mq | F.ctrlVQ) == 0)
        net.close()
        #expect(script.driverClosed())
    }
}
