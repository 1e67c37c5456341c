import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioNet
import Virtqueue

/// Each attack of a hostile net device against our driver, with its exact outcome: the
/// device is broken with the named violation, nothing traps or hangs.
@Suite struct HostileDeviceTests {
    static func connect(
        _ hostility: Hostility, device: VirtioNetDeviceOptions = VirtioNetDeviceOptions(),
        options: VirtioNetDriver.Options = VirtioNetDriver.Options()
    ) throws -> (NetFixture, () throws(NetError) -> VirtioNetDriver) {
        let fixture = try NetFixture(mode: .loopback, options: device) { HostileNetDevice($0, hostility) }
        var options = options
        options.queueSize = 16
        options.controlTimeout = 5
        options.commandTimeout = 0.5
        return (
            fixture,
            { () throws(NetError) in try VirtioNetDriver.connect(socket: fixture.socketPath, options: options) }
        )
    }

    /// Connects and receives until the attack breaks the device; returns its failure.
    static func receiveFailure(_ attack: Hostility.ReceiveAttack, partialChecksum: Bool = false) throws -> NetError? {
        var options = VirtioNetDriver.Options()
        options.partialChecksum = partialChecksum
        let (fixture, connect) = try connect(
            Hostility(receive: attack, extraFeatures: partialChecksum ? NetProtocol.Feature.guestCsum : 0),
            options: options)
        defer { fixture.shutdown() }
        let net = try connect()
        defer { net.close() }
        let batch = NetFrameBatch(capacity: 8, frameCapacity: net.info.maximumFrame)
        let deadline = Deadline.after(seconds: 3)
        while !deadline.hasPassed {
            do {
                _ = try net.pair(0).receive(into: batch)
            } catch {
                #expect(net.failure == error, "the failure is sticky and the same")
                #expect(throws: error) {
                    try net.pair(0).send(testFrame(dst: [2, 0, 0, 0, 0, 1], src: net.info.mac, length: 60, seed: 0))
                }
                return error
            }
            _ = net.pair(0).waitForReceive(until: .after(seconds: 0.05))
        }
        return nil
    }

    @Test func numBuffersZeroBreaksTheDevice() throws {
        let e = try Self.receiveFailure(.init(header: NetHeader(numBuffers: 0)))
        #expect(e == .deviceViolation(.numBuffersInvalid(numBuffers: 0, posted: 16)))
        #expect(e?.rule == .r3)
    }

    @Test func numBuffersHugeBreaksTheDevice() throws {
        let e = try Self.receiveFailure(.init(header: NetHeader(numBuffers: 65535)))
        #expect(e == .deviceViolation(.numBuffersInvalid(numBuffers: 65535, posted: 16)))
    }

    @Test func numBuffersMoreThanPostedBreaksTheDevice() throws {
        let e = try Self.receiveFailure(.init(header: NetHeader(numBuffers: 17)))
        #expect(e == .deviceViolation(.numBuffersInvalid(numBuffers: 17, posted: 16)))
    }

    @Test func usedLengthShorterThanHeaderBreaksTheDevice() throws {
        let e = try Self.receiveFailure(.init(usedLength: 11))
        #expect(e == .deviceViolation(.usedLengthShorterThanHeader(length: 11)))
    }

    @Test func usedLengthBeyondPostedBufferBreaksTheRing() throws {
        let e = try Self.receiveFailure(.init(usedLength: 2049))
        #expect(e == .violation(.usedLengthTooLarge(id: 0, length: 2049, writable: 2048)))
    }

    @Test func gsoGarbageBreaksTheDevice() throws {
        var h = NetHeader(numBuffers: 1)
        h.gsoType = 0x7f
        let e = try Self.receiveFailure(.init(header: h))
        #expect(e == .deviceViolation(.headerInvalid("gso_type 127 although no segmentation offload was negotiated")))
    }

    @Test func gsoSizeWithoutGSOBreaksTheDevice() throws {
        var h = NetHeader(numBuffers: 1)
        h.gsoSize = 1448
        let e = try Self.receiveFailure(.init(header: h))
        #expect(e == .deviceViolation(.headerInvalid("gso_size 1448 with gso_type NONE")))
    }

    @Test func needsCsumWithoutGuestCsumBreaksTheDevice() throws {
        var h = NetHeader(numBuffers: 1)
        h.flags = NetProtocol.HeaderFlag.needsCsum
        let e = try Self.receiveFailure(.init(header: h))
        #expect(e == .deviceViolation(.headerInvalid("flags 0x1 were not negotiated")))
    }

    @Test func csumStartBeyondTheFrameBreaksTheDevice() throws {
        var h = NetHeader(numBuffers: 1)
        h.flags = NetProtocol.HeaderFlag.needsCsum
        h.csumStart = 50
        h.csumOffset = 16
        let e = try Self.receiveFailure(.init(header: h, frameLength: 60), partialChecksum: true)
        #expect(
            e
                == .deviceViolation(
                    .headerInvalid("NEEDS_CSUM csum_start 50 + csum_offset 16 is outside the 60-byte frame")))
    }

    @Test func csumInsideTheFrameIsAccepted() throws {
        var h = NetHeader(numBuffers: 1)
        h.flags = NetProtocol.HeaderFlag.needsCsum
        h.csumStart = 34
        h.csumOffset = 16
        let e = try Self.receiveFailure(.init(header: h, frameLength: 60), partialChecksum: true)
        #expect(e == nil)
    }

    @Test func frameShorterThanEthernetHeaderBreaksTheDevice() throws {
        let e = try Self.receiveFailure(.init(frameLength: 13))
        #expect(e == .deviceViolation(.frameLengthInvalid(length: 13, maximum: 1518)))
    }

    @Test func mergedFrameBeyondMTUBreaksTheDevice() throws {
        // Two full 2 KiB buffers: 4084 bytes of frame for an MTU of 1500.
        let e = try Self.receiveFailure(.init(header: NetHeader(numBuffers: 2), frameLength: 2036, buffers: 2))
        #expect(e == .deviceViolation(.frameLengthInvalid(length: 2036, maximum: 1518)))
    }

    @Test func controlAckNeverComesTimesOut() throws {
        let (fixture, connect) = try Self.connect(Hostility(control: .neverAnswer))
        defer { fixture.shutdown() }
        let net = try connect()
        defer { net.close() }
        let start = Deadline.now
        #expect(throws: NetError.timeout(milliseconds: 500)) { try net.setPromiscuous(true) }
        #expect(Deadline.now.uptimeNanoseconds - start.uptimeNanoseconds < 2_000_000_000)
        #expect(net.failure == .timeout(milliseconds: 500))
    }

    @Test func controlAckGarbageBreaksTheDevice() throws {
        let (fixture, connect) = try Self.connect(Hostility(control: .ack(7)))
        defer { fixture.shutdown() }
        let net = try connect()
        defer { net.close() }
        #expect(throws: NetError.deviceViolation(.controlAckInvalid(ack: 7))) { try net.setPromiscuous(true) }
        #expect(net.isBroken)
    }

    @Test func controlAckLateIsATimeout() throws {
        let (fixture, connect) = try Self.connect(Hostility(control: .lateAck(seconds: 1)))
        defer { fixture.shutdown() }
        let net = try connect()
        defer { net.close() }
        #expect(throws: NetError.timeout(milliseconds: 500)) { try net.setPromiscuous(true) }
    }

    @Test(arguments: [[UInt8](repeating: 0, count: 6), [0x01, 0, 0x5e, 0, 0, 1]])
    func zeroOrMulticastMACIsReplacedByARandomLocalOne(mac: [UInt8]) throws {
        let (fixture, connect) = try Self.connect(
            Hostility(config: { c, _ in
                var c = c
                c.mac = mac
                return c
            }))
        defer { fixture.shutdown() }
        let net = try connect()
        defer { net.close() }
        #expect(net.info.macReplaced)
        #expect(net.info.mac != mac)
        #expect(net.info.mac[0] & 0x03 == 0x02, "locally administered unicast")
    }

    @Test func mtuFlappingBetweenReadsBreaksTheDevice() throws {
        let (fixture, connect) = try Self.connect(
            Hostility(config: { c, n in
                var c = c
                c.mtu = n == 0 ? 1500 : 9000
                return c
            }))
        defer { fixture.shutdown() }
        let net = try connect()
        defer { net.close() }
        #expect(net.info.mtu == 1500)
        #expect(throws: NetError.deviceViolation(.configChanged(field: "mtu", was: 1500, now: 9000))) {
            try net.recheckConfig()
        }
        #expect(net.isBroken)
    }

    @Test(arguments: [(UInt16(0), "max_virtqueue_pairs"), (UInt16(65535), "max_virtqueue_pairs")])
    func maxVirtqueuePairsOutOfRangeIsRefused(value: UInt16, field: String) throws {
        var device = VirtioNetDeviceOptions()
        device.queuePairs = 2
        var options = VirtioNetDriver.Options()
        options.queuePairs = 2
        let (fixture, connect) = try Self.connect(
            Hostility(config: { c, _ in
                var c = c
                c.maxVirtqueuePairs = value
                return c
            }), device: device, options: options)
        defer { fixture.shutdown() }
        #expect(throws: NetError.deviceViolation(.configInvalid(field: field, value: UInt64(value)))) {
            _ = try connect()
        }
    }

    @Test func mtuBelowMinimumIsRefused() throws {
        let (fixture, connect) = try Self.connect(
            Hostility(config: { c, _ in
                var c = c
                c.mtu = 67
                return c
            }))
        defer { fixture.shutdown() }
        #expect(throws: NetError.deviceViolation(.configInvalid(field: "mtu", value: 67))) { _ = try connect() }
    }

    @Test func unknownStatusBitsAreRefused() throws {
        let (fixture, connect) = try Self.connect(
            Hostility(config: { c, _ in
                var c = c
                c.status = 0x81
                return c
            }))
        defer { fixture.shutdown() }
        #expect(throws: NetError.deviceViolation(.configInvalid(field: "status", value: 0x81))) { _ = try connect() }
    }
}
