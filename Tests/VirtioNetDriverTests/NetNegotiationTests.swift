import Testing
import VhostUser
import VirtioNet

/// Feature dependency rules and config validation as pure functions.
@Suite struct NetNegotiationTests {
    typealias F = NetProtocol.Feature

    @Test func controlQueueFeaturesAreDroppedWithoutCtrlVQ() {
        let offered =
            F.ctrlRx | F.ctrlVLAN | F.guestAnnounce | F.mq | F.ctrlMACAddr | F.rss | F.hashReport
            | F.notfCoal | F.status | F.mac
        let f = NetFeatures.select(offered: offered, wanted: ~0)
        #expect(f == F.status | F.mac)
        #expect(NetFeatures.select(offered: offered | F.ctrlVQ, wanted: ~0) == offered | F.ctrlVQ)
    }

    @Test func guestAnnounceNeedsStatus() {
        #expect(NetFeatures.select(offered: F.ctrlVQ | F.guestAnnounce, wanted: ~0) == F.ctrlVQ)
    }

    @Test func ackedSetBreakingADependencyIsRefused() {
        #expect(throws: NetViolation.featureDependency("0x400000 acked without VIRTIO_NET_F_CTRL_VQ")) {
            _ = try NetInfo.validate(NetConfig(), features: F.mq, backendQueues: 1, requestedPairs: 1)
        }
    }

    @Test func configWithoutFeaturesUsesDefaults() throws {
        let info = try NetInfo.validate(
            nil, features: 0, backendQueues: 1, requestedPairs: 4, random: { 0xffff_ffff_ffff })
        #expect(info.mtu == 1500)
        #expect(info.queuePairs == 1)
        #expect(info.linkUp)
        #expect(info.macReplaced)
        #expect(info.mac == [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff])
    }

    @Test func pairsAreClampedToWhatEverySideAllows() throws {
        var c = NetConfig()
        c.maxVirtqueuePairs = 8
        let info = try NetInfo.validate(c, features: F.mq | F.ctrlVQ, backendQueues: 17, requestedPairs: 4)
        #expect(info.maximumQueuePairs == 8)
        #expect(info.queuePairs == 4)
        #expect(throws: NetViolation.configInvalid(field: "max_virtqueue_pairs (above GET_QUEUE_NUM 4)", value: 8)) {
            _ = try NetInfo.validate(c, features: F.mq | F.ctrlVQ, backendQueues: 4, requestedPairs: 4)
        }
    }

    /// No config space (DPDK's vhost) with MQ acked: max_virtqueue_pairs is GET_QUEUE_NUM,
    /// bounded to 1...0x8000; the control queue kept private is not the back-end's.
    @Test func withoutAConfigSpacePairsComeFromGetQueueNum() throws {
        let info = try NetInfo.validate(
            nil, features: F.mq | F.ctrlVQ, backendQueues: 128, requestedPairs: 2, privateControlQueue: true)
        #expect(info.maximumQueuePairs == 128 && info.queuePairs == 2)
        #expect(info.controlQueueIsPrivate && !info.hasControlQueue)
        for bad in [0, 0x8001] {
            #expect(throws: NetViolation.queueCountInvalid(reported: UInt64(bad))) {
                _ = try NetInfo.validate(nil, features: F.mq | F.ctrlVQ, backendQueues: bad, requestedPairs: 2)
            }
        }
    }

    @Test func headerChecksAreExact() {
        var h = NetHeader()
        #expect(h.problem(frameLength: 60, partialChecksum: false) == nil)
        h.flags = NetProtocol.HeaderFlag.dataValid
        #expect(h.problem(frameLength: 60, partialChecksum: true) == nil)
        h.flags = NetProtocol.HeaderFlag.needsCsum
        h.csumStart = 58
        h.csumOffset = 0
        #expect(h.problem(frameLength: 60, partialChecksum: true) == nil)
        h.csumStart = 59
        #expect(h.problem(frameLength: 60, partialChecksum: true) != nil)
        h.csumStart = 0xffff
        h.csumOffset = 0xffff
        #expect(h.problem(frameLength: 60, partialChecksum: true) != nil, "no overflow")
        #expect(NetHeader(h.encoded) == h)
    }
}
