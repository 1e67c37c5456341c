import Foundation
import SharedMemory
import Synchronization
import VhostUser
import VirtioNet
import Virtqueue

/// What a hostile net device does to our driver: the real `VirtioNetDevice` serves
/// everything, except where an attack replaces its config or a queue's handler.
struct Hostility: Sendable {
    /// Rewrites the config on each GET_CONFIG (the argument counts the reads from 0).
    var config: (@Sendable (NetConfig, Int) -> NetConfig)?
    /// Receive queue 0: what each completed buffer looks like (nil: the real device).
    var receive: ReceiveAttack?
    /// The control queue (nil: the real device).
    var control: ControlAttack?
    /// Offered on top of the real device's features.
    var extraFeatures: UInt64 = 0

    struct ReceiveAttack: Sendable {
        var header = NetHeader(numBuffers: 1)
        var frameLength = 60
        /// nil: 12 + frameLength.
        var usedLength: UInt32?
        /// Buffers completed (the attack fires once, on the first ones posted).
        var buffers = 1
    }

    enum ControlAttack: Sendable {
        case neverAnswer
        case ack(UInt8)
        case lateAck(seconds: Double)
    }
}

final class HostileNetDevice: VhostUserDevice, @unchecked Sendable {
    let inner: VirtioNetDevice
    let hostility: Hostility
    let reads = Atomic<Int>(0)

    init(_ inner: VirtioNetDevice, _ hostility: Hostility) {
        self.inner = inner
        self.hostility = hostility
    }

    var features: UInt64 { inner.features | hostility.extraFeatures }
    var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
    var queueCount: Int { inner.queueCount }

    func readConfig(offset: UInt32, size: Int) -> [UInt8]? {
        guard let rewrite = hostility.config else { return inner.readConfig(offset: offset, size: size) }
        let n = reads.add(1, ordering: .relaxed).oldValue
        return rewrite(inner.config, n).read(offset: offset, size: size)
    }

    func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }

    func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        if queue == 0, let attack = hostility.receive { return HostileReceive(attack) }
        if queue == NetProtocol.controlQueue(pairs: inner.options.queuePairs), let attack = hostility.control {
            return HostileControl(attack)
        }
        return inner.makeQueueHandler(queue: queue, features: features)
    }

    func frontendDisconnected() { inner.frontendDisconnected() }
}

/// Completes the first buffers posted with a crafted header and used length.
final class HostileReceive: QueueHandler {
    let attack: Hostility.ReceiveAttack
    var chain = DescriptorChain()
    var fired = false

    init(_ attack: Hostility.ReceiveAttack) { self.attack = attack }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        guard !fired else { return 0 }
        var done = 0
        while done < attack.buffers {
            guard case .ready = try queue.nextChain(into: &chain, memory: memory) else { break }
            guard let buffer = chain.writable.first?.buffer, let base = buffer.baseAddress else { break }
            var bytes = done == 0 ? attack.header.encoded : []
            bytes += (0..<attack.frameLength).map { UInt8(truncatingIfNeeded: $0) }
            let n = min(bytes.count, buffer.count)
            bytes.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: n) }
            queue.complete(head: chain.head, length: attack.usedLength ?? UInt32(n))
            done += 1
        }
        fired = done > 0
        return done
    }
}

/// Answers control commands badly.
final class HostileControl: QueueHandler {
    let attack: Hostility.ControlAttack
    var chain = DescriptorChain()
    var lateSince: Deadline?

    init(_ attack: Hostility.ControlAttack) { self.attack = attack }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        switch attack {
        case .neverAnswer:
            return 0
        case .ack(let value):
            guard case .ready = try queue.nextChain(into: &chain, memory: memory) else { return 0 }
            chain.writable.first?.buffer.baseAddress?.storeBytes(of: value, as: UInt8.self)
            queue.complete(head: chain.head, length: 1)
            return 1
        case .lateAck(let seconds):
            guard case .ready = try queue.nextChain(into: &chain, memory: memory) else { return 0 }
            usleep(UInt32(seconds * 1_000_000))
            chain.writable.first?.buffer.baseAddress?.storeBytes(of: UInt8(0), as: UInt8.self)
            queue.complete(head: chain.head, length: 1)
            return 1
        }
    }
}
