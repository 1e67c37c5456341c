import SharedMemory
import VhostUser

/// Feature selection with the spec's dependency rules (virtio 1.x §5.1.3.1).
public enum NetFeatures {
    /// What we ask for: `wanted` restricted to `offered`, then every feature whose
    /// dependency is missing dropped (CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR,
    /// RSS, HASH_REPORT, NOTF_COAL only with CTRL_VQ; GUEST_ANNOUNCE also needs STATUS).
    public static func select(offered: UInt64, wanted: UInt64) -> UInt64 {
        typealias F = NetProtocol.Feature
        var f = offered & wanted
        if f & F.ctrlVQ == 0 { f &= ~F.needingControlQueue }
        if f & F.status == 0 { f &= ~F.guestAnnounce }
        return f
    }

    /// Why an acked set breaks a dependency rule (a back-end that acked more than was
    /// offered and asked is refused before this), or nil.
    public static func dependencyProblem(_ f: UInt64) -> String? {
        typealias F = NetProtocol.Feature
        if f & F.ctrlVQ == 0 && f & F.needingControlQueue != 0 {
            return "0x\(String(f & F.needingControlQueue, radix: 16)) acked without VIRTIO_NET_F_CTRL_VQ"
        }
        if f & F.guestAnnounce != 0 && f & F.status == 0 { return "GUEST_ANNOUNCE acked without STATUS" }
        return nil
    }
}

/// The device's configuration after validation: every field is checked, clamped or
/// replaced (R3). The driver uses only this, never the raw `NetConfig`.
public struct NetInfo: Sendable, Equatable {
    /// Our MAC: the device's when it is a valid unicast address, else a random locally
    /// administered one (`macReplaced` says which).
    public let mac: [UInt8]
    /// The device offered an all-zero or multicast MAC (or none): `mac` is ours.
    public let macReplaced: Bool
    /// 68...65517 (1500 without VIRTIO_NET_F_MTU).
    public let mtu: Int
    /// The largest frame either side may send: MTU + Ethernet header + a VLAN tag.
    public var maximumFrame: Int { mtu + NetProtocol.ethernetHeaderSize + NetProtocol.vlanTagSize }
    /// max_virtqueue_pairs as validated (1 without MQ).
    public let maximumQueuePairs: Int
    /// Queue pairs we use: min(max_virtqueue_pairs, GET_QUEUE_NUM, asked), at least 1.
    public let queuePairs: Int
    /// LINK_UP (always up without VIRTIO_NET_F_STATUS).
    public let linkUp: Bool
    public let features: UInt64
    /// The raw config as the device served it (for display only, never for decisions).
    public let rawConfig: NetConfig?

    /// CTRL_VQ is acked but the control queue is ours alone: never set up with the
    /// back-end, no command sent on it (QEMU and DPDK's virtio_user keep it from a
    /// vhost-user back-end the same way). Queue pairs are switched on with
    /// VHOST_USER_SET_VRING_ENABLE instead of VQ_PAIRS_SET.
    public let controlQueueIsPrivate: Bool

    public var mergeableRxBuffers: Bool { features & NetProtocol.Feature.mergeableRxBuffers != 0 }
    /// The back-end serves our control queue (CTRL_VQ acked and the queue not kept private).
    public var hasControlQueue: Bool { features & NetProtocol.Feature.ctrlVQ != 0 && !controlQueueIsPrivate }
    /// Received frames may carry NEEDS_CSUM (VIRTIO_NET_F_GUEST_CSUM).
    public var partialChecksum: Bool { features & NetProtocol.Feature.guestCsum != 0 }

    /// Validates `config` (nil: the back-end has no config space) against the acked
    /// `features`. `backendQueues` is GET_QUEUE_NUM (queue pairs, as QEMU and DPDK read
    /// it), `queueLimit` the front-end's clamp of it. Without a config space and with MQ
    /// acked, max_virtqueue_pairs is GET_QUEUE_NUM (as QEMU models it for a vhost-user
    /// back-end). `privateControlQueue`: CTRL_VQ is acked but kept from the back-end.
    public static func validate(
        _ config: NetConfig?, features: UInt64, backendQueues: Int, queueLimit: Int = Int.max, requestedPairs: Int,
        privateControlQueue: Bool = false, random: () -> UInt64 = { UInt64.random(in: 0...UInt64.max) }
    ) throws(NetViolation) -> NetInfo {
        typealias F = NetProtocol.Feature
        if let problem = NetFeatures.dependencyProblem(features) { throw .featureDependency(problem) }
        let c = config ?? NetConfig()
        var mac: [UInt8] = []
        if features & F.mac != 0, config != nil, Self.isUsableMAC(c.mac) { mac = c.mac }
        let replaced = mac.isEmpty
        if replaced { mac = Self.randomLocalMAC(random()) }
        var mtu = NetProtocol.defaultMTU
        if features & F.mtu != 0 {
            guard config != nil, Int(c.mtu) >= NetProtocol.minimumMTU, Int(c.mtu) <= NetProtocol.maximumMTU else {
                throw .configInvalid(field: "mtu", value: UInt64(c.mtu))
            }
            mtu = Int(c.mtu)
        }
        var maxPairs = 1
        if features & F.mq != 0 && config == nil {
            guard backendQueues >= 1, backendQueues <= NetProtocol.maximumQueuePairs else {
                throw .queueCountInvalid(reported: UInt64(max(0, backendQueues)))
            }
            maxPairs = backendQueues
        } else if features & F.mq != 0 {
            let n = Int(c.maxVirtqueuePairs)
            guard config != nil, n >= 1, n <= NetProtocol.maximumQueuePairs else {
                throw .configInvalid(field: "max_virtqueue_pairs", value: UInt64(c.maxVirtqueuePairs))
            }
            guard n <= backendQueues || backendQueues >= queueLimit else {
                throw .configInvalid(
                    field: "max_virtqueue_pairs (above GET_QUEUE_NUM \(backendQueues))", value: UInt64(n))
            }
            maxPairs = n
        }
        var linkUp = true
        if features & F.status != 0, config != nil {
            guard c.status & ~NetProtocol.Status.known == 0 else {
                throw .configInvalid(field: "status", value: UInt64(c.status))
            }
            linkUp = c.status & NetProtocol.Status.linkUp != 0
        }
        let pairs = max(1, min(maxPairs, backendQueues, requestedPairs))
        return NetInfo(
            mac: mac, macReplaced: replaced, mtu: mtu, maximumQueuePairs: maxPairs, queuePairs: pairs,
            linkUp: linkUp, features: features, rawConfig: config,
            controlQueueIsPrivate: privateControlQueue && features & F.ctrlVQ != 0)
    }

    /// Re-reads of the config must match what was validated: MAC (when it was the
    /// device's), MTU and max_virtqueue_pairs are read once and never change (an MTU that
    /// flaps between reads is a fault, not a new value); status only has known bits.
    public func recheck(_ config: NetConfig) throws(NetViolation) -> Bool {
        typealias F = NetProtocol.Feature
        if features & F.mtu != 0, Int(config.mtu) != mtu {
            throw .configChanged(field: "mtu", was: UInt64(mtu), now: UInt64(config.mtu))
        }
        if features & F.mq != 0, Int(config.maxVirtqueuePairs) != maximumQueuePairs {
            throw .configChanged(
                field: "max_virtqueue_pairs", was: UInt64(maximumQueuePairs), now: UInt64(config.maxVirtqueuePairs))
        }
        if features & F.mac != 0, !macReplaced, config.mac != mac {
            throw .configChanged(field: "mac", was: Self.macValue(mac), now: Self.macValue(config.mac))
        }
        guard features & F.status != 0 else { return true }
        guard config.status & ~NetProtocol.Status.known == 0 else {
            throw .configInvalid(field: "status", value: UInt64(config.status))
        }
        return config.status & NetProtocol.Status.linkUp != 0
    }

    /// Unicast and not all-zero.
    public static func isUsableMAC(_ mac: [UInt8]) -> Bool {
        mac.count == 6 && mac[0] & 1 == 0 && mac.contains { $0 != 0 }
    }

    /// A locally administered unicast address from 48 random bits.
    public static func randomLocalMAC(_ bits: UInt64) -> [UInt8] {
        var mac = (0..<6).map { UInt8(truncatingIfNeeded: bits >> (8 * $0)) }
        mac[0] = (mac[0] & 0xfc) | 0x02
        return mac
    }

    static func macValue(_ mac: [UInt8]) -> UInt64 { mac.prefix(6).reduce(0) { $0 << 8 | UInt64($1) } }
}
