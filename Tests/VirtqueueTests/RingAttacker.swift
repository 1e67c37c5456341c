import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// The test playing the untrusted side of one queue of a `RingPair`: raw little-endian
/// stores into the shared ring parts, at the offsets of `SplitLayout` (virtio spec §2.7).
struct RingAttacker {
    let pair: RingPair
    let queue: Int

    init(_ pair: RingPair, queue: Int = 0) {
        self.pair = pair
        self.queue = queue
    }

    var size: Int { pair.layout.queueSize }
    var placement: SplitRingPlacement { pair.ring(queue) }
    var area: DriverRegionLayout.QueueArea { pair.layout.queues[queue] }
    var descriptors: UnsafeMutableRawPointer { pair.region.base + placement.descriptorOffset }
    var avail: UnsafeMutableRawPointer { pair.region.base + placement.availOffset }
    var used: UnsafeMutableRawPointer { pair.region.base + placement.usedOffset }
    var indirect: UnsafeMutableRawPointer { pair.region.base + area.indirectOffset }

    /// Guest address of a byte of the shared region.
    func guest(_ offset: Int) -> UInt64 { pair.guestBase + UInt64(offset) }
    var descriptorTableGuest: UInt64 { guest(placement.descriptorOffset) }
    /// A scratch area inside this queue's bounce pool (for hand-made buffers and tables).
    var scratchOffset: Int { area.bounceOffset }
    var scratchGuest: UInt64 { guest(area.bounceOffset) }
    var regionEndGuest: UInt64 { pair.guestBase + UInt64(pair.region.size) }

    // MARK: device-written parts (the test as a malicious device)

    func writeUsed(slot: Int, id: UInt32, length: UInt32) {
        let e = used + SplitLayout.usedEntryOffset(slot & (size - 1))
        e.storeBytes(of: id.littleEndian, as: UInt32.self)
        (e + 4).storeBytes(of: length.littleEndian, as: UInt32.self)
    }

    func setUsedIndex(_ v: UInt16) {
        SharedAccess.store16Release(used + SplitLayout.usedIdxOffset, v)
    }

    func setUsedFlags(_ v: UInt16) { SharedAccess.store16(used + SplitLayout.usedFlagsOffset, v) }
    func setAvailEvent(_ v: UInt16) { SharedAccess.store16(used + SplitLayout.availEventOffset(size), v) }

    /// Completes `id` at used slot `slot` and publishes `slot + 1` as used.idx.
    func complete(slot: UInt16, id: UInt32, length: UInt32) {
        writeUsed(slot: Int(slot), id: id, length: length)
        setUsedIndex(slot &+ 1)
    }

    // MARK: driver-written parts (the test as a malicious driver)

    static func writeDescriptor(
        _ table: UnsafeMutableRawPointer, _ i: Int, address: UInt64, length: UInt32, flags: UInt16, next: UInt16
    ) {
        let d = table + i * SplitLayout.descriptorSize
        d.storeBytes(of: address.littleEndian, toByteOffset: SplitLayout.descAddr, as: UInt64.self)
        d.storeBytes(of: length.littleEndian, toByteOffset: SplitLayout.descLen, as: UInt32.self)
        d.storeBytes(of: flags.littleEndian, toByteOffset: SplitLayout.descFlags, as: UInt16.self)
        d.storeBytes(of: next.littleEndian, toByteOffset: SplitLayout.descNext, as: UInt16.self)
    }

    func writeDescriptor(_ i: Int, address: UInt64, length: UInt32, flags: UInt16 = 0, next: UInt16 = 0) {
        Self.writeDescriptor(descriptors, i, address: address, length: length, flags: flags, next: next)
    }

    func readDescriptorFlags(_ i: Int) -> UInt16 {
        (descriptors + i * SplitLayout.descriptorSize + SplitLayout.descFlags).load(as: UInt16.self)
    }

    func setAvailEntry(slot: Int, head: UInt16) {
        SharedAccess.store16(avail + SplitLayout.availEntryOffset(slot & (size - 1)), head)
    }

    func setAvailIndex(_ v: UInt16) { SharedAccess.store16Release(avail + SplitLayout.availIdxOffset, v) }
    var availIndex: UInt16 { SharedAccess.load16(avail + SplitLayout.availIdxOffset) }
    func setAvailFlags(_ v: UInt16) { SharedAccess.store16(avail + SplitLayout.availFlagsOffset, v) }
    func setUsedEvent(_ v: UInt16) { SharedAccess.store16(avail + SplitLayout.usedEventOffset(size), v) }
    var usedEvent: UInt16 { SharedAccess.load16(avail + SplitLayout.usedEventOffset(size)) }

    /// Makes `head` available as the next entry (after the current avail.idx).
    func offer(_ head: UInt16) {
        let idx = availIndex
        setAvailEntry(slot: Int(idx), head: head)
        setAvailIndex(idx &+ 1)
    }

    /// Fills `count` bytes at `p` with a pattern that is not a valid anything.
    static func scribble(_ p: UnsafeMutableRawPointer, count: Int, seed: UInt8 = 0xA5) {
        for i in 0..<count {
            p.storeBytes(of: UInt8(truncatingIfNeeded: i &* 131) ^ seed, toByteOffset: i, as: UInt8.self)
        }
    }
}

/// Posts one request on `pair`'s queue `q`: `readable` bytes out, `writable` bytes back,
/// split into `writableSegments` device-writable segments. Returns the head.
@discardableResult
func post(
    _ pair: RingPair, queue q: Int = 0, readable: Int = 16, writable: Int = 64,
    writableSegments: Int = 1, token: UInt64
) throws -> UInt16 {
    let pool = pair.pools[q]
    var segments: [Segment] = []
    if readable > 0 {
        let out = try #require(pool.allocate(readable))
        segments.append(pool.segment(out, deviceWritable: false))
    }
    let part = writable / max(1, writableSegments)
    for i in 0..<writableSegments {
        let n = i == writableSegments - 1 ? writable - part * (writableSegments - 1) : part
        let back = try #require(pool.allocate(max(1, n)))
        segments.append(pool.segment(back, length: n, deviceWritable: true))
    }
    return try pair.drivers[q].add(segments, token: token)
}

/// One echo round trip through `driver`/`device` with a fresh payload; checks the bytes
/// and the checksum. Returns the completion.
@discardableResult
func echo(
    driver: DriverQueue, pool: BouncePool, device: DeviceQueue, memory: GuestMemory,
    payload: [UInt8], token: UInt64 = 7
) throws -> Completion {
    let out = try #require(pool.allocate(payload.count))
    let back = try #require(pool.allocate(payload.count + EchoDevice.checksumSize))
    defer {
        pool.free(out)
        pool.free(back)
    }
    payload.withUnsafeBytes { pool.copyIn(out, from: $0) }
    try driver.add(
        [pool.segment(out, deviceWritable: false), pool.segment(back, deviceWritable: true)], token: token)
    _ = driver.publish()
    var dev = EchoDevice()
    #expect(try dev.serve(device, memory: memory) == 1)
    _ = device.publishUsed()
    let c = try #require(try driver.nextCompletion())
    #expect(c.token == token)
    #expect(Int(c.length) == payload.count + EchoDevice.checksumSize)
    var answer = [UInt8](repeating: 0, count: payload.count + EchoDevice.checksumSize)
    _ = answer.withUnsafeMutableBytes { pool.copyOut(back, validatedLength: Int(c.length), to: $0) }
    #expect(Array(answer[..<payload.count]) == payload.map { $0 ^ 0x5A })
    let sum = payload.withUnsafeBytes { fnv1a($0) }
    var got: UInt64 = 0
    for (i, b) in answer[payload.count...].enumerated() { got |= UInt64(b) << (8 * UInt64(i)) }
    #expect(got == sum)
    return c
}

/// Round trips on queue `q` of `pair` with its own driver and device.
func echoWorks(_ pair: RingPair, queue q: Int, rounds: Int = 3) throws {
    for i in 0..<rounds {
        let payload = (0..<(5 + 97 * i)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) }
        try echo(
            driver: pair.drivers[q], pool: pair.pools[q], device: pair.devices[q], memory: pair.memory,
            payload: payload, token: 1000 + UInt64(i))
    }
}

/// A fresh device queue on `pair`'s queue `q` (after the driver reset the ring).
func freshDevice(_ pair: RingPair, queue q: Int = 0, startIndex: UInt16 = 0) throws -> DeviceQueue {
    let a = pair.layout.ringAddresses(queue: q, guestBase: pair.guestBase)
    return try DeviceQueue(
        queueSize: pair.layout.queueSize, descriptorAddress: a.descriptors, availAddress: a.avail,
        usedAddress: a.used, features: pair.features, memory: pair.memory, startIndex: startIndex)
}
