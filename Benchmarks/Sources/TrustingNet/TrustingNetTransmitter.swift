#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import TrustingRing
import VhostUser
import VirtioNet
import Virtqueue

public enum TrustingNetError: Error, CustomStringConvertible {
    case control(String)
    case system(String)
    public var description: String {
        switch self {
        case .control(let s): "vhost-user: \(s)"
        case .system(let s): s
        }
    }
}

/// BASELINE ONLY — never use outside the benchmarks (docs/design.md R8: the library has one
/// mode, hardened). A deliberately trusting virtio-net transmitter, one split queue pair,
/// in the style of a classic driver:
///
/// - no bounce pool (breaks R7): each transmit slot owns a fixed buffer inside the shared
///   region, the frame is copied straight into it and never zeroed afterwards;
/// - no validation (breaks R2/R3): the used ring through `TrustingDriverQueue` (id and len
///   as written), no config checks (none are read), nothing counted;
/// - no existential ring: the concrete trusting queue is called directly.
///
/// Control path: the same `VhostUser.Frontend`, the same features as the hardened
/// `VirtioNetDriver` with `controlQueue = false, packedRing = false`, the same synthetic
/// addresses and sealed memfd, so the two differ only in the transmit path.
public final class TrustingNetTransmitter {
    public static let guestBase: UInt64 = 0x1_0000_0000
    public static let userBase: UInt64 = 0x5a5a_0000_0000
    static let slotSize = 2048

    let frontend: Frontend
    let region: SharedRegion
    let tx: TrustingDriverQueue
    let txKick: Notifier
    let txCall: Notifier
    let rxKick: Notifier
    let rxCall: Notifier
    let slots: UnsafeMutableRawPointer
    let slotsGuest: UInt64
    let freeSlots: UnsafeMutablePointer<Int>
    var freeCount: Int
    let queueSize: Int
    var segment = Segment(address: 0, length: 0, deviceWritable: false)

    public static func connect(socket path: String, queueSize: Int = 256) throws(TrustingNetError)
        -> TrustingNetTransmitter
    {
        do {
            let f = try Frontend.connect(path: path, replyTimeout: 5)
            return try TrustingNetTransmitter(frontend: f, queueSize: queueSize)
        } catch let e as TrustingNetError {
            throw e
        } catch {
            throw .control("\(error)")
        }
    }

    init(frontend: Frontend, queueSize: Int) throws {
        self.frontend = frontend
        self.queueSize = queueSize
        let offered = try frontend.handshake()
        typealias F = NetProtocol.Feature
        let wanted = VirtioNetDriver.wantedFeatures & ~(F.ctrlVQ | F.guestCsum | F.mq | F.mac | F.mtu | F.status)
        let acked = try frontend.setFeatures(NetFeatures.select(offered: offered, wanted: wanted))
        let eventIndex = acked & FeatureBits.ringEventIndex != 0
        func align(_ x: Int, _ a: Int) -> Int { (x + a - 1) & ~(a - 1) }
        let rxPlacement = SplitRingPlacement(queueSize: queueSize, at: 0)
        let txPlacement = SplitRingPlacement(queueSize: queueSize, at: align(rxPlacement.endOffset, 4096))
        let slotsOffset = align(txPlacement.endOffset, 4096)
        let size = align(slotsOffset + queueSize * Self.slotSize, 4096)
        do {
            region = try SharedRegion(name: "ringfence-trusting-net", size: size)
        } catch {
            throw TrustingNetError.system("\(error)")
        }
        let base = region.base
        tx = TrustingDriverQueue(
            memory: DriverRingMemory(
                queueSize: UInt16(truncatingIfNeeded: queueSize), descriptors: base + txPlacement.descriptorOffset,
                avail: base + txPlacement.availOffset, used: base + txPlacement.usedOffset),
            eventIndex: eventIndex)
        slots = base + slotsOffset
        slotsGuest = Self.guestBase + UInt64(slotsOffset)
        freeSlots = .allocate(capacity: queueSize)
        for i in 0..<queueSize { freeSlots[i] = queueSize - 1 - i }
        freeCount = queueSize
        do {
            txKick = try Notifier()
            txCall = try Notifier()
            rxKick = try Notifier()
            rxCall = try Notifier()
        } catch {
            throw TrustingNetError.system("\(error)")
        }
        try frontend.setMemTable(
            [
                MemoryRegionDescription(
                    guestAddress: Self.guestBase, size: UInt64(size), userAddress: Self.userBase, mmapOffset: 0)
            ],
            descriptors: [region.fileDescriptor])
        for (index, placement, kick, call) in [(0, rxPlacement, rxKick, rxCall), (1, txPlacement, txKick, txCall)] {
            try frontend.setUpQueue(
                index: index, size: queueSize, descriptor: Self.userBase + UInt64(placement.descriptorOffset),
                avail: Self.userBase + UInt64(placement.availOffset),
                used: Self.userBase + UInt64(placement.usedOffset), kick: kick.fileDescriptor,
                call: call.fileDescriptor)
            try frontend.setQueueEnabled(index: index, true)
        }
        try frontend.sync()
    }

    deinit {
        frontend.close()
        freeSlots.deallocate()
    }

    /// Posts frames `0..<batch.count` while slots are free; one publish, one kick if asked.
    public func transmit(_ batch: NetFrameBatch) -> Int {
        while let c = tx.nextCompletion() {
            freeSlots[freeCount] = Int(truncatingIfNeeded: c.token)
            freeCount += 1
        }
        var posted = 0
        for i in 0..<batch.count where freeCount > 0 {
            let frame = batch[i]
            let slot = freeSlots[freeCount - 1]
            let p = slots + slot * Self.slotSize
            p.storeBytes(of: UInt64(0), as: UInt64.self)
            p.storeBytes(of: UInt32(0), toByteOffset: 8, as: UInt32.self)
            if let src = frame.baseAddress { (p + 12).copyMemory(from: src, byteCount: frame.count) }
            segment = Segment(
                address: slotsGuest + UInt64(slot * Self.slotSize), length: UInt32(12 + frame.count),
                deviceWritable: false)
            let added = withUnsafePointer(to: segment) {
                tx.add(UnsafeBufferPointer(start: $0, count: 1), token: UInt64(slot))
            }
            guard added != nil else { break }
            freeCount -= 1
            posted += 1
        }
        if posted > 0 && tx.publish() { _ = txKick.signal() }
        return posted
    }
}
