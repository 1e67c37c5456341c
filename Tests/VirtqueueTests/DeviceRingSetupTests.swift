import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// The device sets a queue up on ring addresses the driver announced (vhost-user
/// SET_VRING_ADDR / SET_VRING_NUM): a bad size, a misaligned part, or a part outside the
/// shared memory is refused before anything is dereferenced.
@Suite struct DeviceRingSetupTests {
    static func make(
        _ pair: RingPair, size: Int = 8, descriptors: UInt64? = nil, avail: UInt64? = nil, used: UInt64? = nil
    ) throws(RingSetupError) -> DeviceQueue {
        let a = pair.layout.ringAddresses(queue: 0, guestBase: pair.guestBase)
        return try DeviceQueue(
            queueSize: size, descriptorAddress: descriptors ?? a.descriptors, availAddress: avail ?? a.avail,
            usedAddress: used ?? a.used, features: RingFeatures(), memory: pair.memory)
    }

    @Test(arguments: [0, -1, 3, 6, 65536, 32769, Int.max, Int.min])
    func invalidQueueSizeIsRefused(size: Int) throws {
        let pair = try RingPair(queueSize: 8)
        #expect(throws: RingSetupError.invalidQueueSize(size)) { try Self.make(pair, size: size) }
    }

    @Test func misalignedRingPartsAreRefused() throws {
        let pair = try RingPair(queueSize: 8)
        let a = pair.layout.ringAddresses(queue: 0, guestBase: pair.guestBase)
        #expect(throws: RingSetupError.misaligned(part: "descriptor table")) {
            try Self.make(pair, descriptors: a.descriptors + 8)
        }
        #expect(throws: RingSetupError.misaligned(part: "avail ring")) { try Self.make(pair, avail: a.avail + 1) }
        #expect(throws: RingSetupError.misaligned(part: "used ring")) { try Self.make(pair, used: a.used + 2) }
        // The alignments virtio requires, and no more, are accepted.
        _ = try Self.make(pair, descriptors: a.descriptors + 16 * 64, avail: a.avail + 2, used: a.used + 4)
    }

    @Test func ringPartsOutsideSharedMemoryAreRefused() throws {
        let pair = try RingPair(queueSize: 8)
        let end = pair.guestBase + UInt64(pair.region.size)
        let tableSize = UInt64(SplitLayout.descriptorTableSize(8))
        #expect(throws: RingSetupError.unmapped(part: "descriptor table", .unmapped(address: 0, length: tableSize))) {
            try Self.make(pair, descriptors: 0)
        }
        // Straddling the end of the region by one descriptor.
        #expect(
            throws: RingSetupError.unmapped(part: "descriptor table", .unmapped(address: end - 112, length: tableSize))
        ) {
            try Self.make(pair, descriptors: end - 112)
        }
        let availSize = UInt64(SplitLayout.availRingSize(8))
        #expect(throws: RingSetupError.unmapped(part: "avail ring", .unmapped(address: end - 20, length: availSize))) {
            try Self.make(pair, avail: end - 20)
        }
        let usedSize = UInt64(SplitLayout.usedRingSize(8))
        #expect(
            throws: RingSetupError.unmapped(
                part: "used ring", .overflow(address: 0xFFFF_FFFF_FFFF_FFF0, length: usedSize))
        ) {
            try Self.make(pair, used: 0xFFFF_FFFF_FFFF_FFF0)
        }
        // Exactly at the end is fine.
        // 72 bytes: 4-aligned
        _ = try Self.make(pair, descriptors: end - tableSize, avail: end - availSize, used: end - usedSize - 2)
    }

    @Test func ringsByUserAddressUseTheUserSpace() throws {
        let pair = try RingPair(queueSize: 8)
        let a = pair.layout.ringAddresses(queue: 0, guestBase: pair.guestBase)
        let userBase = pair.memory.regions[0].userAddress
        func user(_ g: UInt64) -> UInt64 { g - pair.guestBase + userBase }
        let device = try DeviceQueue(
            queueSize: 8, userDescriptorAddress: user(a.descriptors), userAvailAddress: user(a.avail),
            userUsedAddress: user(a.used), features: RingFeatures(), memory: pair.memory)
        // It serves the driver's requests like the one set up by guest address.
        try echo(driver: pair.driver, pool: pair.pool, device: device, memory: pair.memory, payload: [1, 2, 3])
        // Guest addresses are not user addresses.
        #expect(throws: RingSetupError.self) {
            try DeviceQueue(
                queueSize: 8, userDescriptorAddress: a.descriptors, userAvailAddress: a.avail,
                userUsedAddress: a.used, features: RingFeatures(), memory: pair.memory)
        }
    }

    @Test func startIndexResumesAfterReconnect() throws {
        // A device that reconnects at the driver's current index (GET/SET_VRING_BASE) goes on
        // without a spurious "avail index jumped" violation.
        let pair = try RingPair(queueSize: 8)
        try echoWorks(pair, queue: 0, rounds: 13)
        let resumed = try freshDevice(pair, startIndex: 13)
        for i in 0..<20 {
            try echo(driver: pair.driver, pool: pair.pool, device: resumed, memory: pair.memory, payload: [UInt8(i)])
        }
        #expect(resumed.usedIndex == 33 && resumed.lastAvail == 33)
    }
}
