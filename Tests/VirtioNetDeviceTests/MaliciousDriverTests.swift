import SharedMemory
import Testing
import VhostUser
import VirtioNet
import Virtqueue
import RingTestSupport

/// A malicious driver against our net device's queue handlers, in one process: each
/// hostile chain is completed with length 0 and counted, never forwarded, and the queue
/// goes on.
@Suite struct MaliciousDriverTests {
    /// A device on a loopback fabric with its transmit handler (queue 1), receive handler
    /// (queue 0) and control handler (queue 2) on one in-process ring pair of 3 queues.
    final class Bed {
        let fabric = NetFabric(mode: .loopback)
        let device: VirtioNetDevice
        let pair: RingPair
        let rx: any QueueHandler
        let tx: any QueueHandler
        let control: any QueueHandler
        let wake: Notifier

        init(mergeable: Bool = true, queueSize: Int = 16, inOrder: Bool = false) throws {
            var options = VirtioNetDeviceOptions()
            options.queueSize = queueSize
            device = VirtioNetDevice(fabric: fabric, options: options)
            pair = try RingPair(queueCount: 3, queueSize: queueSize, features: RingFeatures(inOrder: inOrder))
            var features = device.features
            if !mergeable { features &= ~NetProtocol.Feature.mergeableRxBuffers }
            rx = device.makeQueueHandler(queue: 0, features: features)
            tx = device.makeQueueHandler(queue: 1, features: features)
            control = device.makeQueueHandler(queue: 2, features: features)
            wake = try Notifier()
            rx.attach(wake: QueueWake(wake))
        }

        /// Posts one chain on queue `q` made of `pieces` (bytes, device-writable), returns its head.
        @discardableResult
        func post(_ q: Int, _ pieces: [(bytes: [UInt8], writable: Bool)]) throws -> UInt16 {
            let pool = pair.pools[q]
            var segments: [Segment] = []
            for p in pieces {
                let slice = try #require(pool.allocate(max(1, p.bytes.count)))
                p.bytes.withUnsafeBytes { pool.copyIn(slice, from: $0) }
                segments.append(pool.segment(slice, length: p.bytes.count, deviceWritable: p.writable))
            }
            let head = try pair.drivers[q].add(segments, token: UInt64(q))
            _ = pair.drivers[q].publish()
            return head
        }

        func serve(_ q: Int) throws -> Int {
            let handler = [rx, tx, control][q]
            let n = try handler.serve(pair.devices[q], memory: pair.memory, budget: 64)
            _ = pair.devices[q].publishUsed()
            return n
        }

        func completions(_ q: Int) throws -> [Completion] {
            var out: [Completion] = []
            while let c = try pair.drivers[q].nextCompletion() { out.append(c) }
            return out
        }
    }

    static let header = [UInt8](repeating: 0, count: 12)
    static func frame(_ n: Int) -> [UInt8] {
        [0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x88, 0xb5] + [UInt8](repeating: 0xab, count: max(0, n - 14))
    }

    @Test func wellFormedFrameIsForwarded() throws {
        let bed = try Bed()
        try bed.post(1, [(Self.header + Self.frame(60), false)])
        #expect(try bed.serve(1) == 1)
        #expect(try bed.completions(1).map(\.length) == [0], "transmit used len is 0")
        #expect(bed.device.statistics.transmitted == 1)
        #expect(bed.device.statistics.transmittedBytes == 60, "the frame, not its virtio-net header")
        #expect(bed.device.statistics.violations.isEmpty)
        #expect(bed.fabric.statistics.framesDelivered == 1)
    }

    @Test func headerAndFrameSplitAcrossDescriptorsIsForwarded() throws {
        let bed = try Bed()
        let bytes = Self.header + Self.frame(100)
        try bed.post(1, [(Array(bytes[0..<5]), false), (Array(bytes[5..<40]), false), (Array(bytes[40...]), false)])
        #expect(try bed.serve(1) == 1)
        #expect(bed.device.statistics.transmitted == 1)
    }

    static let hostile: [(String, [UInt8])] = {
        var gso = header
        gso[1] = 1  // TCPv4 without HOST_TSO4
        var gsoSize = header
        gsoSize[4] = 0x05
        var csum = header
        csum[0] = 1  // NEEDS_CSUM without CSUM offered
        csum[6] = 0xff
        csum[7] = 0xff
        var flags = header
        flags[0] = 0x80
        return [
            ("gso type", gso + frame(60)), ("gso size", gsoSize + frame(60)), ("needs csum", csum + frame(60)),
            ("unknown flags", flags + frame(60)), ("shorter than a header", [0, 0, 0]),
            ("shorter than an Ethernet header", header + [1, 2, 3]), ("longer than MTU + 18", header + frame(1519)),
        ]
    }()

    @Test(arguments: 0..<7)
    func hostileTransmitChainIsRefusedAndTheQueueGoesOn(index: Int) throws {
        let (name, bytes) = Self.hostile[index]
        let bed = try Bed()
        try bed.post(1, [(bytes, false)])
        try bed.post(1, [(Self.header + Self.frame(60), false)])
        #expect(try bed.serve(1) == 2, "\(name)")
        #expect(try bed.completions(1).map(\.length) == [0, 0])
        #expect(bed.device.statistics.transmitRejected == 1, "\(name)")
        #expect(bed.device.statistics.violations == ["R3": 1], "counted under its rule for --metrics")
        #expect(bed.device.statistics.transmitted == 1)
        #expect(bed.device.statistics.transmittedBytes == 60, "the good frame's bytes only")
        #expect(bed.fabric.statistics.framesDelivered == 1, "only the good frame")
        #expect(bed.fabric.statistics.framesRejected == 1)
    }

    /// On a packed ring the transmit queue pops runs of single-descriptor chains together
    /// (`PackedDeviceQueue.nextBuffers`): every hostile frame in a run is still refused
    /// and counted, a writable single buffer too, a walked chain between runs is served
    /// by `nextChain`, and only the good frames are forwarded; every buffer comes back.
    @Test(arguments: [false, true])
    func packedTransmitRunsRefuseEachHostileFrame(inOrder: Bool) throws {
        let fabric = NetFabric(mode: .sink)
        let device = VirtioNetDevice(fabric: fabric, options: .init())
        let p = try PackedRingPair(queueCount: 2, queueSize: 32, features: RingFeatures(inOrder: inOrder))
        let tx = device.makeQueueHandler(queue: 1, features: device.features)
        let pool = p.pools[1]
        func post(_ pieces: [(bytes: [UInt8], writable: Bool)]) throws {
            var segments: [Segment] = []
            for piece in pieces {
                let slice = try #require(pool.allocate(piece.bytes.count))
                piece.bytes.withUnsafeBytes { pool.copyIn(slice, from: $0) }
                segments.append(pool.segment(slice, deviceWritable: piece.writable))
            }
            _ = try p.drivers[1].add(segments, token: 0)
        }
        let good = Self.header + Self.frame(60)
        var slots = 0
        for (_, bytes) in Self.hostile {  // each hostile frame between two good ones
            try post([(good, false)])
            try post([(bytes, false)])
            slots += 2
        }
        try post([(good, true)])  // a writable single buffer
        try post([(Array(good[0..<20]), false), (Array(good[20...]), false)])  // walked
        try post([(good, false)])
        slots += 4
        _ = p.drivers[1].publish()
        #expect(try tx.serve(p.devices[1], memory: p.memory, budget: 32) == 17)
        _ = p.devices[1].publishUsed()
        #expect(device.statistics.transmitted == 9)
        #expect(device.statistics.transmittedBytes == 9 * 60)
        #expect(device.statistics.transmitRejected == 8)
        #expect(device.statistics.violations == ["R3": 8])
        #expect(p.devices[1].usedIndex == UInt16(slots))
        if !inOrder {
            var reclaimed = 0
            while try p.drivers[1].nextCompletion() != nil { reclaimed += 1 }
            #expect(reclaimed == 17, "every buffer back")
        }
    }

    @Test func writableDescriptorInATransmitChainIsRefused() throws {
        let bed = try Bed()
        try bed.post(1, [(Self.header + Self.frame(60), false), ([0, 0], true)])
        #expect(try bed.serve(1) == 1)
        #expect(bed.device.statistics.transmitRejected == 1)
        #expect(bed.device.statistics.violations == ["R3": 1])
        #expect(bed.fabric.statistics.framesDelivered == 0)
    }

    // MARK: receive

    /// Loops one frame of `length` bytes back to queue 0 through the transmit queue.
    func loop(_ bed: Bed, length: Int) throws {
        try bed.post(1, [(Self.header + Self.frame(length), false)])
        _ = try bed.serve(1)
    }

    @Test func receiveWritesHeaderWithNumBuffersOne() throws {
        let bed = try Bed()
        try loop(bed, length: 60)
        try bed.post(0, [([UInt8](repeating: 0xee, count: 2048), true)])
        #expect(try bed.serve(0) == 1)
        let c = try bed.completions(0)
        #expect(c.map(\.length) == [72])
        #expect(bed.pair.pools[0].base.load(fromByteOffset: 10, as: UInt8.self) == 1, "num_buffers 1")
    }

    @Test func mergeableFrameSpansSmallBuffersWithNumBuffersCounted() throws {
        let bed = try Bed()
        try loop(bed, length: 1000)
        for _ in 0..<5 { try bed.post(0, [([UInt8](repeating: 0, count: 256), true)]) }
        #expect(try bed.serve(0) == 4, "1012 bytes in 256-byte buffers: 4 buffers")
        #expect(try bed.completions(0).map(\.length) == [256, 256, 256, 244])
        #expect(bed.pair.pools[0].base.load(fromByteOffset: 10, as: UInt8.self) == 4)
    }

    @Test func tinyBuffersThatCanNeverHoldAFrameAreReturnedEmpty() throws {
        let bed = try Bed(queueSize: 16)
        try loop(bed, length: 1500)
        for _ in 0..<16 { try bed.post(0, [([0], true)]) }
        // 16 one-byte buffers cannot hold 1512 bytes; the ring bounds the frame's buffers.
        _ = try bed.serve(0)
        let c = try bed.completions(0)
        #expect(c.count == 16)
        #expect(c.allSatisfy { $0.length == 0 })
        #expect(bed.device.statistics.receiveDropped == 1)
        #expect(bed.device.statistics.received == 0)
    }

    @Test func readableReceiveBufferIsRefused() throws {
        let bed = try Bed()
        try loop(bed, length: 60)
        try bed.post(0, [([1, 2, 3], false), ([UInt8](repeating: 0, count: 2048), true)])
        try bed.post(0, [([UInt8](repeating: 0, count: 2048), true)])
        #expect(try bed.serve(0) == 2)
        #expect(try bed.completions(0).map(\.length) == [0, 72])
        #expect(bed.device.statistics.receiveRejected == 1)
        #expect(bed.device.statistics.violations == ["R3": 1], "a readable receive buffer breaks R3")
        #expect(bed.device.statistics.received == 1)
        #expect(bed.device.statistics.receivedBytes == 60)
    }

    @Test func tooSmallBufferWithoutMergeableDropsTheFrameAndKeepsTheBuffer() throws {
        let bed = try Bed(mergeable: false)
        try loop(bed, length: 1000)
        try loop(bed, length: 60)
        try bed.post(0, [([UInt8](repeating: 0, count: 100), true)])
        #expect(try bed.serve(0) == 1, "the 1000-byte frame is dropped, the 60-byte one fits")
        #expect(try bed.completions(0).map(\.length) == [72])
        #expect(bed.device.statistics.receiveDropped == 1)
    }

    @Test func noReceiveBuffersLeavesFramesWaitingUntilTheInboxIsFull() throws {
        let bed = try Bed()
        for _ in 0..<3 { try loop(bed, length: 60) }
        #expect(try bed.serve(0) == 0)
        try bed.post(0, [([UInt8](repeating: 0, count: 2048), true)])
        #expect(try bed.serve(0) == 1)
    }

    // MARK: control

    func command(_ bed: Bed, _ bytes: [UInt8]) throws -> UInt8? {
        try bed.post(2, [(bytes, false), ([0xff], true)])
        _ = try bed.serve(2)
        guard let c = try bed.completions(2).first, c.length == 1 else { return nil }
        // The command's slice comes first in the fresh pool, the ack's right after it.
        let ackOffset = BouncePool.granules(for: max(1, bytes.count)) * BouncePool.granule
        return bed.pair.pools[2].base.load(fromByteOffset: ackOffset, as: UInt8.self)
    }

    @Test func controlCommandsAreCheckedExactly() throws {
        let cases: [([UInt8], UInt8)] = [
            ([0, 0, 1], 0),  // promisc on
            ([0, 0], 1),  // promisc without its byte
            ([0, 0, 1, 1], 1),  // promisc with a byte too many
            ([1, 1, 2, 0, 0, 0, 0, 1], 0),  // MAC_ADDR_SET unicast
            ([1, 1, 1, 0, 0, 0, 0, 1], 1),  // MAC_ADDR_SET multicast
            ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0),  // MAC table: two empty tables
            ([1, 0, 0xff, 0xff, 0xff, 0xff], 1),  // MAC table: absurd count
            ([4, 0, 1, 0], 1),  // MQ without MQ negotiated
            ([3, 0], 0),  // ANNOUNCE_ACK
            ([0x7f, 0x7f], 1),  // unknown class
        ]
        for (bytes, expected) in cases {
            let bed = try Bed()
            #expect(try command(bed, bytes) == expected, "\(bytes)")
        }
    }

    @Test func controlChainWithoutAckByteIsCompletedEmpty() throws {
        let bed = try Bed()
        try bed.post(2, [([0, 0, 1], false)])
        #expect(try bed.serve(2) == 1)
        #expect(try bed.completions(2).map(\.length) == [0])
        #expect(bed.device.statistics.controlRefused == 1)
    }

    @Test func oversizedControlCommandIsRefused() throws {
        let bed = try Bed()
        #expect(try command(bed, [1, 0] + [UInt8](repeating: 0, count: 900)) == 1)
    }

    // MARK: batching and idling (what the device benchmark leans on)

    @Test func transmitServesOneBatchPerCallSoUsedIsPublishedPerBatch() throws {
        let bed = try Bed(queueSize: 64)
        for _ in 0..<40 { try bed.post(1, [(Self.header + Self.frame(60), false)]) }
        #expect(try bed.serve(1) == 32, "one batch of 32 although the budget is 64")
        #expect(try bed.completions(1).count == 32, "published before the rest is served")
        #expect(try bed.serve(1) == 8)
        #expect(bed.device.statistics.transmitted == 40)
        #expect(bed.fabric.statistics.framesDelivered == 40)
    }

    @Test func receiveBuffersWithoutFramesAreNoWorkForTheQueueThread() throws {
        let bed = try Bed()
        try bed.post(0, [([UInt8](repeating: 0, count: 2048), true)])
        #expect(!bed.rx.workIsAvailable(bed.pair.devices[0]), "buffers, empty inbox: the thread may block")
        try loop(bed, length: 60)
        #expect(bed.rx.workIsAvailable(bed.pair.devices[0]), "a frame waits for the buffer")
        #expect(try bed.serve(0) == 1)
        #expect(!bed.rx.workIsAvailable(bed.pair.devices[0]))
        try bed.post(1, [(Self.header + Self.frame(60), false)])
        #expect(bed.tx.workIsAvailable(bed.pair.devices[1]), "transmit: the ring is the work")
    }

    @Test func plainHeaderFastPathAgreesWithTheFullCheck() {
        var bytes = [UInt8](repeating: 0, count: 12)
        for flags: UInt8 in [0, 1, 2, 3, 0x80] {
            for gso: UInt8 in [0, 1, 3, 4, 5, 0x80] {
                for gsoSize: UInt16 in [0, 1, 0x100, 0xffff] {
                    for other: UInt8 in [0, 0xff] {
                        bytes[0] = flags
                        bytes[1] = gso
                        bytes[2] = other  // hdr_len
                        bytes[4] = UInt8(gsoSize & 0xff)
                        bytes[5] = UInt8(gsoSize >> 8)
                        bytes[6] = other  // csum_start
                        bytes[8] = other  // csum_offset
                        let plain = bytes.withUnsafeBytes { NetHeader.isPlain(bytes: $0.baseAddress!) }
                        let accepted = NetHeader(bytes).problem(frameLength: 60, partialChecksum: false) == nil
                        #expect(plain == accepted, "flags \(flags) gso \(gso) size \(gsoSize) other \(other)")
                    }
                }
            }
        }
    }

    // MARK: VIRTIO_F_IN_ORDER

    @Test func inOrderIsOfferedUnlessTurnedOff() {
        #expect(VirtioNetDevice(fabric: NetFabric(mode: .sink), options: .init()).features & FeatureBits.inOrder != 0)
        var options = VirtioNetDeviceOptions()
        options.inOrder = false
        #expect(VirtioNetDevice(fabric: NetFabric(mode: .sink), options: options).features & FeatureBits.inOrder == 0)
    }

    /// A refused receive buffer behind one held for a waiting frame: with IN_ORDER the
    /// held one is given back first (empty), so buffers are used in the order posted;
    /// the frame then fills the buffers after them.
    @Test(arguments: [false, true])
    func refusedReceiveBufferBehindAHeldOneKeepsThePostedOrderWithInOrder(inOrder: Bool) throws {
        let bed = try Bed(inOrder: inOrder)
        try loop(bed, length: 1000)
        let held = try bed.post(0, [([UInt8](repeating: 0, count: 256), true)])
        let refused = try bed.post(0, [([1, 2, 3], false), ([UInt8](repeating: 0, count: 256), true)])
        var rest: [UInt16] = []
        for _ in 0..<4 { rest.append(try bed.post(0, [([UInt8](repeating: 0, count: 256), true)])) }
        _ = try bed.serve(0)
        let c = try bed.completions(0)
        if inOrder {
            #expect(c.map(\.head) == [held, refused] + rest, "every buffer in the order posted")
            #expect(c.map(\.length) == [0, 0, 256, 256, 256, 244])
        } else {
            #expect(c.map(\.head) == [refused, held] + rest.prefix(3), "the refused one first, the held one used")
            #expect(c.map(\.length) == [0, 256, 256, 256, 244])
        }
        #expect(bed.device.statistics.received == 1, "the frame is delivered either way")
        #expect(bed.device.statistics.receiveRejected == 1, "only the refused buffer counts as refused")
        #expect(bed.device.statistics.violations == ["R3": 1])
    }

    /// On a packed ring with IN_ORDER the transmit queue completes its batch unwritten:
    /// one used descriptor for the batch, at its first slot, with its last buffer id.
    @Test func inOrderPackedTransmitBatchGetsOneUsedDescriptor() throws {
        let fabric = NetFabric(mode: .sink)
        let device = VirtioNetDevice(fabric: fabric, options: .init())
        let p = try PackedRingPair(queueCount: 2, queueSize: 16, features: RingFeatures(inOrder: true))
        let tx = device.makeQueueHandler(queue: 1, features: device.features)
        var ids: [UInt16] = []
        for n in 0..<5 {
            let bytes = n == 2 ? [0, 0, 0] : Self.header + Self.frame(60)  // one refused chain in the batch
            let slice = try #require(p.pools[1].allocate(bytes.count))
            bytes.withUnsafeBytes { p.pools[1].copyIn(slice, from: $0) }
            ids.append(try p.drivers[1].add([p.pools[1].segment(slice, deviceWritable: false)], token: UInt64(n)))
        }
        _ = p.drivers[1].publish()
        #expect(try tx.serve(p.devices[1], memory: p.memory, budget: 16) == 5)
        _ = p.devices[1].publishUsed()
        let used = PackedLayout.usedMarker(wrap: true)
        let first = p.descriptor(0, queue: 1)
        #expect(first.load(fromByteOffset: PackedLayout.descFlags, as: UInt16.self) == used)
        #expect(first.load(fromByteOffset: PackedLayout.descID, as: UInt16.self) == ids[4], "the batch's last id")
        for slot in 1..<5 {
            let flags = p.descriptor(slot, queue: 1).load(fromByteOffset: PackedLayout.descFlags, as: UInt16.self)
            #expect(flags == PackedLayout.availableMarker(wrap: true), "slot \(slot) not written")
        }
        #expect(p.devices[1].usedIndex == 5)
        #expect(device.statistics.transmitted == 4)
        #expect(device.statistics.transmitRejected == 1)
    }
}
