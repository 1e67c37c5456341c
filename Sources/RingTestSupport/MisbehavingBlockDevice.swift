import SharedMemory
import VhostUser
import VirtioBlock
import Virtqueue

/// The real blk device behind whatever identity a test gives `MisbehavingBlockBackend`:
/// its features, queue count and config space (any values, nonsense included), while
/// requests are served by the device's own `BlockRequestHandler` on a scratch image.
final class MisbehavingBlockDevice: VhostUserDevice {
    let inner: VirtioBlockDevice
    let peer: MisbehavingBlockBackend

    init(inner: VirtioBlockDevice, peer: MisbehavingBlockBackend) {
        self.inner = inner
        self.peer = peer
    }

    var features: UInt64 { peer.features }
    var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
    var queueCount: Int { Int(clamping: peer.queueNum) }
    var maximumChainLength: Int { inner.maximumChainLength }

    func readConfig(offset: UInt32, size: Int) -> [UInt8]? { peer.config.read(offset: offset, size: size) }
    func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { inner.writeConfig(offset: offset, bytes: bytes) }

    func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        MisbehavingQueueHandler(inner: inner.makeQueueHandler(queue: queue, features: features), peer: peer)
    }

    func frontendDisconnected() { inner.frontendDisconnected() }
}

/// Counts what the real handler serves and, for `unsolicitedMessage`, once `after`
/// requests were served, answers the next request by speaking first on the control socket.
final class MisbehavingQueueHandler: QueueHandler {
    let inner: any QueueHandler
    let peer: MisbehavingBlockBackend

    init(inner: any QueueHandler, peer: MisbehavingBlockBackend) {
        self.inner = inner
        self.peer = peer
    }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        if peer.isHolding { return 0 }
        if peer.misbehaviour == .unsolicitedMessage && peer.report.requestsServed >= peer.after {
            return try speakUnasked(queue, memory: memory, budget: budget)
        }
        let served = try inner.serve(queue, memory: memory, budget: budget)
        if served > 0 { peer.noteServed(served) }
        return served
    }

    /// Pops each request and, instead of completing it, sends a message the driver never asked for.
    private func speakUnasked(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        var chain = DescriptorChain()
        var completed = 0
        for _ in 0..<budget {
            switch try queue.nextChain(into: &chain, memory: memory) {
            case .empty: return completed
            case .rejected(let head, _):
                queue.complete(head: head, length: 0)
                completed += 1
            case .ready: peer.speakUnasked()
            }
        }
        return completed
    }

    func beforePublish(_ queue: any DeviceRing, memory: GuestMemory) { inner.beforePublish(queue, memory: memory) }
    func idle(_ queue: any DeviceRing, memory: GuestMemory) { inner.idle(queue, memory: memory) }
}
