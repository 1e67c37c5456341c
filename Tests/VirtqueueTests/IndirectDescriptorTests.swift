import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// VIRTIO_F_INDIRECT_DESC on the driver: multi-segment requests take one slot of the
/// descriptor table and an indirect table of their own; the device sees exactly the
/// buffers that were posted.
@Suite struct IndirectDescriptorTests {
    static let indirect = RingFeatures(indirectDescriptors: true)

    static func segments(_ pair: RingPair, readable: [Int], writable: [Int]) throws -> [Segment] {
        var s: [Segment] = []
        for n in readable { s.append(pair.pool.segment(try #require(pair.pool.allocate(n)), deviceWritable: false)) }
        for n in writable { s.append(pair.pool.segment(try #require(pair.pool.allocate(n)), deviceWritable: true)) }
        return s
    }

    /// The device pops one chain; its segments must be exactly `posted`, translated into
    /// the shared region.
    static func expectDeviceSees(_ pair: RingPair, _ posted: [Segment], head: UInt16) throws {
        var chain = DescriptorChain()
        #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(chain.head == head)
        #expect(chain.segments.count == posted.count)
        for (seg, p) in zip(chain.segments, posted) {
            #expect(seg.guestAddress == p.address)
            #expect(seg.buffer.count == Int(p.length))
            #expect(seg.deviceWritable == p.deviceWritable)
            #expect(seg.buffer.baseAddress == pair.region.base + Int(p.address - pair.guestBase))
        }
        let r = posted.filter { !$0.deviceWritable }
        #expect(chain.firstWritable == r.count)
        #expect(chain.readableLength == r.reduce(0) { $0 + UInt64($1.length) })
        #expect(chain.writableLength == posted.filter(\.deviceWritable).reduce(0) { $0 + UInt64($1.length) })
    }

    @Test func multiSegmentRequestGoesThroughIndirectTable() throws {
        let pair = try RingPair(queueSize: 8, features: Self.indirect, indirectEntries: 4)
        let a = RingAttacker(pair)
        let posted = try Self.segments(pair, readable: [16, 100], writable: [7])
        let head = try pair.driver.add(posted, token: 1)
        #expect(pair.driver.freeCount == 7)
        // The table entry is one INDIRECT descriptor pointing at this head's table.
        let d = a.descriptors + Int(head) * SplitLayout.descriptorSize
        #expect(d.load(fromByteOffset: SplitLayout.descFlags, as: UInt16.self) == SplitLayout.flagIndirect)
        #expect(d.load(fromByteOffset: SplitLayout.descLen, as: UInt32.self) == 3 * 16)
        let tableOffset = a.area.indirectOffset + Int(head) * 4 * SplitLayout.descriptorSize
        #expect(d.load(fromByteOffset: SplitLayout.descAddr, as: UInt64.self) == a.guest(tableOffset))
        _ = pair.driver.publish()
        try Self.expectDeviceSees(pair, posted, head: head)
        pair.device.complete(head: head, length: 7)
        _ = pair.device.publishUsed()
        let c = try #require(try pair.driver.nextCompletion())
        #expect(c.token == 1 && c.length == 7)
        #expect(pair.driver.freeCount == 8)
    }

    @Test func singleSegmentRequestStaysDirect() throws {
        let pair = try RingPair(queueSize: 8, features: Self.indirect, indirectEntries: 4)
        let posted = try Self.segments(pair, readable: [], writable: [32])
        let head = try pair.driver.add(posted, token: 1)
        #expect(RingAttacker(pair).readDescriptorFlags(Int(head)) == SplitLayout.flagWrite)
        _ = pair.driver.publish()
        try Self.expectDeviceSees(pair, posted, head: head)
    }

    @Test func requestLargerThanIndirectTableFallsBackToDirectChain() throws {
        let pair = try RingPair(queueSize: 8, features: Self.indirect, indirectEntries: 4)
        let posted = try Self.segments(pair, readable: [1, 2, 3], writable: [4, 5])
        let head = try pair.driver.add(posted, token: 1)
        #expect(pair.driver.freeCount == 3)
        #expect(RingAttacker(pair).readDescriptorFlags(Int(head)) == SplitLayout.flagNext)
        _ = pair.driver.publish()
        try Self.expectDeviceSees(pair, posted, head: head)
    }

    @Test func indirectTablesAreNotUsedWithoutTheFeature() throws {
        let pair = try RingPair(queueSize: 8, indirectEntries: 4)
        let posted = try Self.segments(pair, readable: [10], writable: [20, 30])
        let head = try pair.driver.add(posted, token: 1)
        #expect(pair.driver.freeCount == 5)
        #expect(RingAttacker(pair).readDescriptorFlags(Int(head)) & SplitLayout.flagIndirect == 0)
        _ = pair.driver.publish()
        try Self.expectDeviceSees(pair, posted, head: head)
    }

    @Test func indirectThresholdKeepsSmallRequestsDirect() throws {
        let pair = try RingPair(queueSize: 8, features: Self.indirect, indirectEntries: 4)
        pair.driver.indirectThreshold = 3
        let three = try Self.segments(pair, readable: [10], writable: [20, 30])
        try pair.driver.add(three, token: 1)
        #expect(pair.driver.freeCount == 5)
        let four = try Self.segments(pair, readable: [10, 11], writable: [20, 30])
        try pair.driver.add(four, token: 2)
        #expect(pair.driver.freeCount == 4)
    }

    @Test func fullQueueOfIndirectRequestsRoundTrips() throws {
        let pair = try RingPair(queueSize: 8, features: Self.indirect, indirectEntries: 4)
        var posted: [UInt16: [Segment]] = [:]
        for t in 0..<8 {
            let s = try Self.segments(pair, readable: [5 + t], writable: [4, 4 + t, 8])
            posted[try pair.driver.add(s, token: UInt64(t))] = s
        }
        #expect(pair.driver.freeCount == 0)
        #expect(throws: SubmitError.full) {
            try pair.driver.add(try Self.segments(pair, readable: [1], writable: [1]), token: 9)
        }
        _ = pair.driver.publish()
        // Each head's own table: the device sees each request's buffers, none mixed up.
        var chain = DescriptorChain()
        for _ in 0..<8 {
            #expect(try pair.device.nextChain(into: &chain, memory: pair.memory) == .ready)
            let p = try #require(posted[chain.head])
            #expect(chain.segments.map(\.guestAddress) == p.map(\.address))
            pair.device.complete(head: chain.head, length: UInt32(chain.writableLength))
        }
        _ = pair.device.publishUsed()
        var tokens: [UInt64] = []
        while let c = try pair.driver.nextCompletion() { tokens.append(c.token) }
        #expect(tokens.sorted() == (0..<8).map { UInt64($0) })
        #expect(pair.driver.freeCount == 8)
        try echoWorks(pair, queue: 0, rounds: 5)
    }
}
