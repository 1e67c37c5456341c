#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import VhostUser

/// The back-end framework's `DeviceHandler` with `MisbehavingBlockBackend`'s
/// protocol-level misbehaviours: what no device hook can do, because the framework only
/// ever answers. Everything it does not change is forwarded, so every check still runs.
final class MisbehavingHandler: VhostUserBackendHandler {
    let inner: any VhostUserBackendHandler
    let peer: MisbehavingBlockBackend
    /// `ackThenClose`: the request was acked; the next one ends the connection.
    var hangUpNext = false
    /// `deafAfter`: the request was answered; the control socket is not served again.
    var deaf = false

    init(inner: any VhostUserBackendHandler, peer: MisbehavingBlockBackend) {
        self.inner = inner
        self.peer = peer
    }

    func requestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) throws(Refusal) {
        if hangUpNext { throw .malformed(.invalidPayload("misbehaving: hangs up after acking")) }
        if deaf {
            // The control thread stops here, so nothing more is read until the test ends.
            while !peer.isStopped { usleep(10_000) }
            throw .malformed(.channel(.closed))
        }
        switch peer.misbehaviour {
        case .ackThenClose(request): hangUpNext = true
        case .deafAfter(request): deaf = true
        default: break
        }
        try inner.requestReceived(request, payload: payload, descriptors: descriptors)
    }

    /// Exactly what the peer was configured with (the framework would add PROTOCOL_FEATURES).
    func getFeatures() -> UInt64 { peer.features }

    /// Any set, REPLY_ACK included or not (the framework always offers it).
    func getProtocolFeatures() -> ProtocolFeatures { peer.protocolFeatures }

    func setMemTable(_ regions: [GuestRegion]) throws(Refusal) {
        try inner.setMemTable(regions)
        peer.sharedRegions.withLock { $0 = regions }
    }

    func addMemReg(_ region: GuestRegion) throws(Refusal) {
        try inner.addMemReg(region)
        peer.sharedRegions.withLock { $0.append(region) }
    }

    // MARK: forwarded

    func setFeatures(_ features: UInt64) throws(Refusal) { try inner.setFeatures(features) }
    func setOwner() throws(Refusal) { try inner.setOwner() }
    func resetOwner() throws(Refusal) { try inner.resetOwner() }
    func resetDevice() throws(Refusal) { try inner.resetDevice() }
    func setProtocolFeatures(_ features: ProtocolFeatures) throws(Refusal) {
        try inner.setProtocolFeatures(features)
    }
    func getQueueNum() throws(Refusal) -> UInt64 { try inner.getQueueNum() }
    func getMaxMemSlots() throws(Refusal) -> UInt64 { try inner.getMaxMemSlots() }
    func remMemReg(_ region: MemoryRegionDescription) throws(Refusal) { try inner.remMemReg(region) }
    func setVringNum(_ state: VringState) throws(Refusal) { try inner.setVringNum(state) }
    func setVringBase(_ state: VringState) throws(Refusal) { try inner.setVringBase(state) }
    func setVringAddr(_ address: VringAddress) throws(Refusal) { try inner.setVringAddr(address) }
    func getVringBase(_ state: VringState) throws(Refusal) -> VringState { try inner.getVringBase(state) }
    func setVringKick(_ file: VringFile, _ kick: Notifier?) throws(Refusal) {
        try inner.setVringKick(file, kick)
    }
    func setVringCall(_ file: VringFile, _ call: Notifier?) throws(Refusal) {
        try inner.setVringCall(file, call)
    }
    func setVringErr(_ file: VringFile, _ err: Notifier?) throws(Refusal) { try inner.setVringErr(file, err) }
    func setVringEnable(_ state: VringState) throws(Refusal) { try inner.setVringEnable(state) }
    func getConfig(offset: UInt32, size: Int, flags: UInt32) throws(Refusal) -> [UInt8] {
        try inner.getConfig(offset: offset, size: size, flags: flags)
    }
    func setConfig(offset: UInt32, bytes: [UInt8], flags: UInt32) throws(Refusal) {
        try inner.setConfig(offset: offset, bytes: bytes, flags: flags)
    }
}
