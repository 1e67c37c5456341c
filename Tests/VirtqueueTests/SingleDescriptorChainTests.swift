import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// A chain of one direct descriptor (what a net driver posts per frame) is popped without
/// a walk and its segment replaced in place in the reused `DescriptorChain`: the chain
/// must come out exactly as the walk builds it, whatever the previous chain was.
@Suite struct SingleDescriptorChainTests {
    /// One ring of either format, its pool and the device side.
    struct Bed {
        let driver: any DriverRing
        let device: any DeviceRing
        let pool: BouncePool
        let memory: GuestMemory
        let keep: AnyObject
    }

    static func bed(_ format: RingFormat) throws -> Bed {
        switch format {
        case .split:
            let p = try RingPair(queueSize: 8, bounceBytesPerQueue: 64 * 1024)
            return Bed(driver: p.driver, device: p.device, pool: p.pool, memory: p.memory, keep: p)
        case .packed:
            let p = try PackedRingPair(queueSize: 8, bounceBytesPerQueue: 64 * 1024)
            return Bed(driver: p.driver, device: p.device, pool: p.pool, memory: p.memory, keep: p)
        }
    }

    /// What each request is: (length, device-writable) per segment.
    static let requests: [[(Int, Bool)]] = [
        [(76, false)],  // single readable (a transmitted frame)
        [(12, false), (64, true)],  // walked: readable + writable
        [(1526, true)],  // single writable (a receive buffer)
        [(76, false)],  // single readable again, after a single writable
        [(12, false), (20, false), (30, false)],  // walked, three readable
        [(64, true)],  // single writable after three segments
    ]

    @Test(arguments: RingFormat.allCases)
    func singleDescriptorChainsComeOutAsTheWalkBuildsThem(format: RingFormat) throws {
        let b = try Self.bed(format)
        var chain = DescriptorChain()
        for (n, request) in Self.requests.enumerated() {
            var segments: [Segment] = []
            for (length, writable) in request {
                let slice = try #require(b.pool.allocate(length))
                segments.append(b.pool.segment(slice, deviceWritable: writable))
            }
            let id = try b.driver.add(segments, token: UInt64(n))
            _ = b.driver.publish()
            #expect(try b.device.nextChain(into: &chain, memory: b.memory) == .ready)
            #expect(chain.head == id)
            #expect(chain.segments.count == request.count, "request \(n)")
            let readable = request.filter { !$0.1 }
            #expect(chain.firstWritable == readable.count, "request \(n)")
            #expect(chain.readableLength == UInt64(readable.reduce(0) { $0 + $1.0 }), "request \(n)")
            #expect(chain.writableLength == UInt64(request.filter { $0.1 }.reduce(0) { $0 + $1.0 }), "request \(n)")
            for (s, posted) in zip(chain.segments, segments) {
                #expect(s.guestAddress == posted.address)
                #expect(s.buffer.count == Int(posted.length))
                #expect(s.deviceWritable == posted.deviceWritable)
                let expected = try b.memory.translate(posted.address, length: UInt64(posted.length))
                #expect(s.buffer.baseAddress == expected.baseAddress)
            }
            b.device.complete(head: id, length: 0)
            _ = b.device.publishUsed()
            #expect(try b.driver.nextCompletion()?.token == UInt64(n))
        }
    }

    /// A single descriptor whose buffer lies outside guest memory is rejected as the walk
    /// rejects it (the fast path falls back to the walk's own check).
    @Test(arguments: RingFormat.allCases)
    func singleDescriptorOutsideMemoryIsRejectedAsTheWalkRejectsIt(format: RingFormat) throws {
        let b = try Self.bed(format)
        let outside = b.pool.guestAddress &+ (1 << 32)
        let id = try b.driver.add([Segment(address: outside, length: 64, deviceWritable: false)], token: 1)
        _ = b.driver.publish()
        var chain = DescriptorChain()
        let name: UInt16 = format == .split ? id : 0  // packed violations name the first slot
        #expect(
            try b.device.nextChain(into: &chain, memory: b.memory)
                == .rejected(head: id, .descriptorAddressInvalid(head: name, .unmapped(address: outside, length: 64))))
        #expect(!b.device.isBroken)
    }
}
