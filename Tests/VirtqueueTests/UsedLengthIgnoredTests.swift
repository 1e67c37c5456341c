import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// `usedLengthIgnored` (virtio-net transmit queues): a device-readable chain completed
/// with any used length reports 0 and the queue stays healthy; without it the same
/// completion breaks the queue (R3), as before.
@Suite struct UsedLengthIgnoredTests {
    func exercise(driver: any DriverRing, device: any DeviceRing, pool: BouncePool, memory: GuestMemory, ignored: Bool)
        throws -> Result<UInt32, Violation>
    {
        driver.usedLengthIgnored = ignored
        let slice = try #require(pool.allocate(64))
        try driver.add([pool.segment(slice, deviceWritable: false)], token: 7)
        _ = driver.publish()
        var chain = DescriptorChain()
        #expect(try device.nextChain(into: &chain, memory: memory) == .ready)
        device.complete(head: chain.head, length: 1234)
        _ = device.publishUsed()
        do {
            let c = try #require(try driver.nextCompletion())
            #expect(c.token == 7)
            return .success(c.length)
        } catch let v as Violation {
            return .failure(v)
        }
    }

    @Test(arguments: [true, false])
    func splitTransmitLengthIsIgnoredOnlyWhenAsked(ignored: Bool) throws {
        let pair = try RingPair(queueSize: 8)
        let r = try exercise(
            driver: pair.driver, device: pair.device, pool: pair.pool, memory: pair.memory, ignored: ignored)
        #expect(r == (ignored ? .success(0) : .failure(.usedLengthTooLarge(id: 0, length: 1234, writable: 0))))
        #expect(pair.driver.isBroken == !ignored)
    }

    @Test(arguments: [true, false])
    func packedTransmitLengthIsIgnoredOnlyWhenAsked(ignored: Bool) throws {
        let pair = try PackedRingPair(queueSize: 8)
        let r = try exercise(
            driver: pair.driver, device: pair.device, pool: pair.pool, memory: pair.memory, ignored: ignored)
        #expect(r == (ignored ? .success(0) : .failure(.usedLengthTooLarge(id: 0, length: 1234, writable: 0))))
        pair.driver.reset()
        #expect(pair.driver.usedLengthIgnored == ignored, "kept across reset")
    }
}
