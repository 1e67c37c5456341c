import SharedMemory
import Synchronization
import VhostUser
import VirtioFS
import Virtqueue

/// Holds a device's answers: while `held`, the request queues take every request off the
/// ring and keep it unanswered (`chainsHeld` counts them: the device has them);
/// released, their threads are woken and execute them, in order. A device that answers
/// late, for the cancellation tests.
final class HoldSwitch: Sendable {
    let holding = Atomic<Bool>(false)
    let wakes = Mutex<[QueueWake]>([])
    let heldChains = Atomic<Int>(0)

    /// Requests the device took and has not answered.
    var chainsHeld: Int { heldChains.load(ordering: .acquiring) }

    var held: Bool { holding.load(ordering: .acquiring) }

    func hold() { holding.store(true, ordering: .releasing) }

    func release() {
        holding.store(false, ordering: .releasing)
        for w in wakes.withLock({ $0 }) { w.signal() }
    }
}

/// The real `VirtioFSDevice`, its request queues served through a `HoldSwitch`.
final class HoldingFSDevice: VhostUserDevice {
    let inner: VirtioFSDevice
    let hold: HoldSwitch

    init(_ inner: VirtioFSDevice, hold: HoldSwitch) {
        self.inner = inner
        self.hold = hold
    }

    var features: UInt64 { inner.features }
    var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
    var queueCount: Int { inner.queueCount }
    func readConfig(offset: UInt32, size: Int) -> [UInt8]? { inner.readConfig(offset: offset, size: size) }
    func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { inner.writeConfig(offset: offset, bytes: bytes) }
    func frontendDisconnected() { inner.frontendDisconnected() }

    func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        let handler = inner.makeQueueHandler(queue: queue, features: features)
        guard queue > 0, let fs = handler as? FSRequestHandler else { return handler }
        return HoldingHandler(fs, hold: hold)
    }
}

final class HoldingHandler: QueueHandler {
    let inner: FSRequestHandler
    let hold: HoldSwitch
    var chain = DescriptorChain()
    var stash: [DescriptorChain] = []

    init(_ inner: FSRequestHandler, hold: HoldSwitch) {
        self.inner = inner
        self.hold = hold
    }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        if hold.held {
            while true {
                switch try queue.nextChain(into: &chain, memory: memory) {
                case .empty: return 0
                case .rejected(let head, _):
                    queue.complete(head: head, length: 0)
                    return 1
                case .ready:
                    stash.append(chain)
                    hold.heldChains.add(1, ordering: .releasing)
                }
            }
        }
        return answerStash(queue) + (try inner.serve(queue, memory: memory, budget: budget))
    }

    /// Executes and completes the held requests, oldest first.
    func answerStash(_ queue: any DeviceRing) -> Int {
        let held = stash
        stash.removeAll()
        for c in held {
            queue.complete(head: c.head, length: inner.execute(c))
            hold.heldChains.subtract(1, ordering: .releasing)
        }
        return held.count
    }

    func beforePublish(_ queue: any DeviceRing, memory: GuestMemory) { inner.beforePublish(queue, memory: memory) }
    func idle(_ queue: any DeviceRing, memory: GuestMemory) { inner.idle(queue, memory: memory) }

    func attach(wake: QueueWake) {
        hold.wakes.withLock { $0.append(wake) }
        inner.attach(wake: wake)
    }

    func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int {
        answerStash(queue) + inner.stopping(queue, memory: memory)
    }
}
