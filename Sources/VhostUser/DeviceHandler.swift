public import SharedMemory
import Virtqueue

/// The back-end framework's handler (rust-vmm's `vhost-user-backend`): carries out each
/// request for any `VhostUserDevice`. It owns the negotiated features, the memory table,
/// the vrings and their worker threads; the device owns semantics, `RequestDispatcher`
/// the protocol checks. One per connection, used on its control thread only.
public final class DeviceHandler: VhostUserBackendHandler {
    /// The device served.
    public let device: any VhostUserDevice
    let connection: Int
    let configuration: Backend.Configuration
    let report: @Sendable (BackendEvent) -> Void
    var ackedFeatures: UInt64 = 0
    var memory = GuestMemory()
    var vrings: [Vring]

    /// Protocol features the transport implements; the device may add `.config`.
    static let transportProtocolFeatures: ProtocolFeatures = [
        .multiQueue, .replyAck, .configureMemSlots, .resetDevice,
    ]

    init(
        device: any VhostUserDevice, connection: Int, configuration: Backend.Configuration,
        report: @escaping @Sendable (BackendEvent) -> Void
    ) {
        self.device = device
        self.connection = connection
        self.configuration = configuration
        self.report = report
        let count = max(0, min(device.queueCount, 256))
        vrings = (0..<count).map { _ in Vring() }
    }

    var offeredFeatures: UInt64 { device.features | FeatureBits.protocolFeatures }
    var offeredProtocol: ProtocolFeatures {
        Self.transportProtocolFeatures.union(device.protocolFeatures)
    }

    /// VIRTIO_F_RING_PACKED acked: rings are packed (desc = ring, avail = driver area,
    /// used = device area; the base carries the wrap counters).
    var packed: Bool { ackedFeatures & FeatureBits.ringPacked != 0 }

    // MARK: VhostUserBackendHandler

    /// Passes the request to the device's hook (if it records control traffic).
    public func requestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) {
        device.controlRequestReceived(request, payload: payload, descriptors: descriptors)
    }

    /// The device's features (ring and VERSION_1 bits included).
    public func getFeatures() -> UInt64 { offeredFeatures }

    /// Acks `features`; bits not offered are refused (R3).
    public func setFeatures(_ features: UInt64) throws(Refusal) {
        guard features & ~offeredFeatures == 0 else {
            throw .refused("features 0x\(String(features & ~offeredFeatures, radix: 16)) were not offered")
        }
        ackedFeatures = features
        report(.featuresAcked(connection: connection, features: features))
    }

    /// Accepted (no state).
    public func setOwner() {}

    /// Stops every ring.
    public func resetOwner() { resetRings() }

    /// Stops every ring.
    public func resetDevice() { resetRings() }

    /// The protocol features offered.
    public func getProtocolFeatures() -> ProtocolFeatures { offeredProtocol }

    /// Acks `features`; bits not offered are refused (R3).
    public func setProtocolFeatures(_ features: ProtocolFeatures) throws(Refusal) {
        guard offeredProtocol.isSuperset(of: features) else {
            throw .refused(
                "protocol features 0x\(String(features.subtracting(offeredProtocol).rawValue, radix: 16)) were not offered"
            )
        }
    }

    /// The device's queue count.
    public func getQueueNum() -> UInt64 { UInt64(vrings.count) }

    /// Most memory regions accepted.
    public func getMaxMemSlots() -> UInt64 { UInt64(GuestMemory.maximumRegions) }

    /// Maps the driver's memory (sealed, bounded, no overlap) and replaces the table (R4, R7).
    public func setMemTable(_ regions: [GuestRegion]) throws(Refusal) {
        let new: GuestMemory
        do { new = try GuestMemory(regions) } catch { throw .refused(error.description) }
        replaceMemory(with: new)
    }

    /// Adds one region (checked as for SET_MEM_TABLE).
    public func addMemReg(_ region: GuestRegion) throws(Refusal) {
        var new = memory
        do { try new.add(region) } catch { throw .refused(error.description) }
        replaceMemory(with: new)
    }

    /// Removes a region (refused if it is not in the table).
    public func remMemReg(_ region: MemoryRegionDescription) throws(Refusal) {
        var new = memory
        guard new.remove(guestAddress: region.guestAddress, size: region.size) else {
            throw .refused("no region 0x\(String(region.guestAddress, radix: 16))+\(region.size) to remove")
        }
        replaceMemory(with: new)
    }

    /// Sets a queue's size (checked against the configured limit).
    public func setVringNum(_ state: VringState) throws(Refusal) {
        let ring = try vring(state.index, stopped: true)
        let n = Int(state.num)
        let validSize = packed ? PackedLayout.isValidQueueSize(n) : SplitLayout.isValidQueueSize(n)
        guard validSize, n <= configuration.maximumQueueSize else {
            throw .refused("queue size \(state.num) is not a power of two in 1...\(configuration.maximumQueueSize)")
        }
        ring.size = n
    }

    /// Sets a queue's next available index (packed: index and wrap counters).
    public func setVringBase(_ state: VringState) throws(Refusal) {
        let ring = try vring(state.index, stopped: true)
        guard packed || state.num <= UInt32(UInt16.max) else {
            throw .refused("vring base \(state.num) does not fit a split ring index")
        }
        ring.base = state.num
    }

    /// Sets a queue's ring addresses (inside mapped memory, aligned).
    public func setVringAddr(_ address: VringAddress) throws(Refusal) {
        let ring = try vring(address.index, stopped: true)
        guard address.flags == 0 else {
            throw .refused("vring flags 0x\(String(address.flags, radix: 16)) (logging) not supported")
        }
        guard let size = ring.size else { throw .refused("SET_VRING_ADDR before SET_VRING_NUM") }
        // Validate now (inside mapped memory, aligned), so the front-end hears about it.
        _ = try makeQueue(address: address, size: size, base: ring.base)
        ring.address = address
    }

    /// Stops the queue and returns its next available index.
    public func getVringBase(_ state: VringState) throws(Refusal) -> VringState {
        let ring = try vring(state.index, stopped: false)
        stopWorker(Int(state.index))
        ring.kick = nil
        ring.kickReceived = false
        return VringState(index: state.index, num: ring.base)
    }

    /// Sets (or clears) the queue's kick eventfd.
    public func setVringKick(_ file: VringFile, _ kick: Notifier?) throws(Refusal) {
        let ring = try vring(UInt32(file.index), stopped: false)
        stopWorker(Int(file.index))
        ring.kick = kick
        ring.kickReceived = true
        // Without protocol features a ring is enabled as soon as it is kicked.
        if ackedFeatures & FeatureBits.protocolFeatures == 0 { ring.enabled = true }
        try startIfReady(Int(file.index))
    }

    /// Sets (or clears) the queue's call eventfd.
    public func setVringCall(_ file: VringFile, _ call: Notifier?) throws(Refusal) {
        try vring(UInt32(file.index), stopped: false).call.replace(with: call)
    }

    /// Sets (or clears) the queue's error eventfd.
    public func setVringErr(_ file: VringFile, _ err: Notifier?) throws(Refusal) {
        try vring(UInt32(file.index), stopped: false).err = err
    }

    /// Enables or disables a queue.
    public func setVringEnable(_ state: VringState) throws(Refusal) {
        let ring = try vring(state.index, stopped: false)
        guard state.num <= 1 else { throw .refused("SET_VRING_ENABLE with \(state.num)") }
        ring.enabled = state.num == 1
        if ring.enabled { try startIfReady(Int(state.index)) } else { stopWorker(Int(state.index)) }
    }

    /// Reads the device's config space (the device may refuse the range).
    public func getConfig(offset: UInt32, size: Int, flags: UInt32) throws(Refusal) -> [UInt8] {
        guard let bytes = device.readConfig(offset: offset, size: size) else {
            throw .refused("config read \(offset)+\(size) refused by the device")
        }
        return bytes
    }

    /// Writes the device's config space (the device decides).
    public func setConfig(offset: UInt32, bytes: [UInt8], flags: UInt32) throws(Refusal) {
        guard device.writeConfig(offset: offset, bytes: bytes) else {
            throw .refused("config write \(offset)+\(bytes.count) refused by the device")
        }
    }

    // MARK: vrings and memory

    private func vring(_ index: UInt32, stopped: Bool) throws(Refusal) -> Vring {
        guard index < UInt32(vrings.count) else {
            throw .refused("queue index \(index) (device has \(vrings.count))")
        }
        let ring = vrings[Int(index)]
        if stopped && ring.worker != nil { throw .refused("queue \(index) is running") }
        return ring
    }

    private func makeQueue(address a: VringAddress, size: Int, base: UInt32) throws(Refusal) -> any DeviceRing {
        let features = RingFeatures(
            eventIndex: ackedFeatures & FeatureBits.ringEventIndex != 0,
            indirectDescriptors: ackedFeatures & FeatureBits.ringIndirectDescriptors != 0,
            inOrder: ackedFeatures & FeatureBits.inOrder != 0)
        do {
            if packed {
                return try PackedDeviceQueue(
                    queueSize: size, userRingAddress: a.descriptor, userDriverAreaAddress: a.avail,
                    userDeviceAreaAddress: a.used, features: features, memory: memory, base: base,
                    indirectLimit: device.maximumChainLength)
            }
            return try DeviceQueue(
                queueSize: size, userDescriptorAddress: a.descriptor, userAvailAddress: a.avail,
                userUsedAddress: a.used, features: features, memory: memory,
                startIndex: UInt16(truncatingIfNeeded: base),
                indirectLimit: device.maximumChainLength)
        } catch {
            throw .refused("ring \(a.index): \(error)")
        }
    }

    /// Starts the ring's thread once it has memory, size, addresses, a kick and is enabled.
    private func startIfReady(_ index: Int) throws(Refusal) {
        let ring = vrings[index]
        guard ring.worker == nil, ring.enabled, ring.kickReceived, let size = ring.size,
            let address = ring.address
        else { return }
        let queue = try makeQueue(address: address, size: size, base: ring.base)
        let handler = device.makeQueueHandler(queue: index, features: ackedFeatures)
        do {
            let worker = try QueueWorker(
                index: index, queue: queue, memory: memory, handler: handler, kick: ring.kick,
                call: ring.call, err: ring.err, timing: configuration.queueTiming, report: report)
            try worker.start()
            ring.worker = worker
        } catch {
            throw .refused("queue \(index): \(error)")
        }
        report(.queueStarted(queue: index, size: size))
    }

    private func stopWorker(_ index: Int) {
        let ring = vrings[index]
        guard let worker = ring.worker else { return }
        ring.base = worker.stop()
        ring.worker = nil
        report(.queueStopped(queue: index, index: UInt16(truncatingIfNeeded: ring.base)))
    }

    /// Rings point into memory: stop them, swap the table, restart them on the new one.
    /// The table change itself succeeds (it is what the front-end asked for); a ring
    /// whose memory went away stays stopped, reported and signalled on its err fd (R6),
    /// and the other rings go on.
    private func replaceMemory(with new: GuestMemory) {
        let running = vrings.indices.filter { vrings[$0].worker != nil }
        for i in running { stopWorker(i) }
        memory = new
        for i in running {
            do throws(Refusal) { try startIfReady(i) } catch {
                report(.queueNotRestarted(queue: i, reason: error.description))
                vrings[i].err?.signal()
            }
        }
    }

    private func resetRings() {
        for i in vrings.indices { stopWorker(i) }
        vrings = vrings.map { _ in Vring() }
        ackedFeatures = 0
    }

    /// The connection ended: rings stop, memory is unmapped, the device forgets it.
    func tearDown() {
        for i in vrings.indices { stopWorker(i) }
        vrings = []
        memory = GuestMemory()
        device.frontendDisconnected()
    }
}
