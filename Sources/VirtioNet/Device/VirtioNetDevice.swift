public import VhostUser
import SharedMemory
import Synchronization
import Virtqueue

/// Settings of a served virtio-net device (one port of a `NetFabric`).
public struct VirtioNetDeviceOptions: Sendable {
    /// nil: a random locally administered address.
    public var mac: [UInt8]?
    public var mtu = NetProtocol.defaultMTU
    public var queuePairs = 1
    /// Largest ring the driver may set up.
    public var queueSize = 256
    public var packedRing = true
    public var mergeableRxBuffers = true
    public var controlQueue = true
    /// Offer VIRTIO_F_IN_ORDER (buffers used in the order posted, as DPDK's vhost offers
    /// it): a driver that acks it may reclaim transmit buffers without reading each used
    /// entry, and a packed transmit queue gets one used descriptor per batch.
    public var inOrder = true
    /// Frames each receive queue holds for its driver before dropping.
    public var inboxFrames = 1024

    public init() {}

    /// Why a set of options cannot serve.
    public func validate() -> String? {
        if queuePairs < 1 || queuePairs > 64 { return "queue pairs \(queuePairs) not in 1...64" }
        if !SplitLayout.isValidQueueSize(queueSize) || queueSize < 4 {
            return "queue size \(queueSize) is not a power of two in 4...32768"
        }
        if mtu < NetProtocol.minimumMTU || mtu > NetProtocol.maximumMTU {
            return "mtu \(mtu) not in \(NetProtocol.minimumMTU)...\(NetProtocol.maximumMTU)"
        }
        if let mac, !NetInfo.isUsableMAC(mac) { return "\(formatMAC(mac)) is not a unicast address" }
        if inboxFrames < 1 || inboxFrames > 65536 { return "inbox of \(inboxFrames) frames" }
        return nil
    }
}

/// Counters of one device (port), for logs and tests.
public struct NetDeviceStatistics: Sendable, Equatable {
    /// Frames the driver transmitted that passed the checks.
    public var transmitted: UInt64 = 0
    /// Bytes of those frames (Ethernet header on, virtio-net header off).
    public var transmittedBytes: UInt64 = 0
    /// Transmit chains refused (header, length, layout), each completed with length 0.
    public var transmitRejected: UInt64 = 0
    /// Frames written into the driver's receive buffers.
    public var received: UInt64 = 0
    /// Bytes of those frames (Ethernet header on, virtio-net header off).
    public var receivedBytes: UInt64 = 0
    /// Frames dropped on the receive side (no or too small buffers).
    public var receiveDropped: UInt64 = 0
    /// Receive chains refused (unwritable, malformed), completed with length 0.
    public var receiveRejected: UInt64 = 0
    public var controlCommands: UInt64 = 0
    public var controlRefused: UInt64 = 0
    /// Chains refused on either queue, by the rule they broke ("R3": n): a malformed
    /// transmit header or length, or a buffer of the wrong direction, is R3.
    public var violations: [String: UInt64] = [:]
}

/// A virtio-net device model (virtio 1.x §5.1) for `VhostUser.Backend`, hardened against
/// the driver: every transmit header and frame is copied once into private memory (R2)
/// and checked (R3: gso, flags, csum_start/offset, lengths) before it is forwarded; a bad
/// chain is completed with length 0 and counted; receive buffers are only written, with
/// num_buffers bounded by the queue; control commands are bounded and answered OK or ERR.
public final class VirtioNetDevice: VhostUserDevice {
    public let fabric: NetFabric
    public let options: VirtioNetDeviceOptions
    public let mac: [UInt8]
    let port: NetPort
    let onEvent: @Sendable (BackendEvent) -> Void
    let counters = Mutex(NetDeviceStatistics())
    /// Every queue's receive wake, so a disconnect can detach them.
    let status = Atomic<UInt16>(NetProtocol.Status.linkUp)

    public init(
        fabric: NetFabric, options: VirtioNetDeviceOptions,
        onEvent: @escaping @Sendable (BackendEvent) -> Void = { _ in }
    ) {
        self.fabric = fabric
        self.options = options
        self.mac = options.mac ?? NetInfo.randomLocalMAC(UInt64.random(in: 0...UInt64.max))
        self.onEvent = onEvent
        let slot = options.mtu + NetProtocol.ethernetHeaderSize + NetProtocol.vlanTagSize
        port = fabric.register(
            inboxes: (0..<options.queuePairs).map { _ in NetInbox(capacity: options.inboxFrames, slotSize: slot) })
    }

    public var statistics: NetDeviceStatistics { counters.withLock { $0 } }

    func count(_ body: (inout NetDeviceStatistics) -> Void) { counters.withLock { body(&$0) } }

    /// The largest frame accepted or delivered.
    public var maximumFrame: Int { options.mtu + NetProtocol.ethernetHeaderSize + NetProtocol.vlanTagSize }

    public var features: UInt64 {
        typealias F = NetProtocol.Feature
        var f =
            FeatureBits.version1 | FeatureBits.ringIndirectDescriptors | FeatureBits.ringEventIndex | F.mac | F.mtu
            | F.status
        if options.packedRing { f |= FeatureBits.ringPacked }
        if options.mergeableRxBuffers { f |= F.mergeableRxBuffers }
        if options.inOrder { f |= FeatureBits.inOrder }
        if options.controlQueue {
            f |= F.ctrlVQ | F.ctrlRx | F.ctrlMACAddr
            if options.queuePairs > 1 { f |= F.mq }
        }
        return f
    }

    public var protocolFeatures: ProtocolFeatures { .config }

    /// Receive and transmit queue of every pair, then the control queue.
    public var queueCount: Int { 2 * options.queuePairs + (options.controlQueue ? 1 : 0) }

    public var config: NetConfig {
        var c = NetConfig()
        c.mac = mac
        c.status = status.load(ordering: .relaxed)
        c.maxVirtqueuePairs = UInt16(options.queuePairs)
        c.mtu = UInt16(options.mtu)
        return c
    }

    public func readConfig(offset: UInt32, size: Int) -> [UInt8]? { config.read(offset: offset, size: size) }

    /// The config space is read-only (MAC changes go through the control queue).
    public func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }

    public func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        if options.controlQueue && queue == NetProtocol.controlQueue(pairs: options.queuePairs) {
            return NetControlHandler(device: self, features: features)
        }
        let pair = queue / 2
        if queue % 2 == 0 {
            return NetReceiveHandler(device: self, pair: pair, inbox: port.inbox(pair), features: features)
        }
        return NetTransmitHandler(device: self, pair: pair, features: features)
    }

    public func frontendDisconnected() {
        for inbox in port.inboxes {
            inbox.setWake(nil)
            inbox.clear()
        }
        fabric.forgetAddresses(port: port.id)
    }
}
