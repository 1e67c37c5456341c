public import SharedMemory

/// Why a back-end did not carry out a request. The two cases are the protocol's two
/// answers to a front-end that asked for something wrong.
public enum Refusal: Error, Sendable, CustomStringConvertible {
    /// Well-formed but not acceptable: answered with a failure under REPLY_ACK, otherwise
    /// the connection is dropped (the front-end would believe it succeeded).
    case refused(String)
    /// Malformed (or a handler that gives up on the front-end): the connection is dropped.
    case malformed(VhostUserError)

    /// One line naming what was refused.
    public var description: String {
        switch self {
        case .refused(let why): return why
        case .malformed(let e): return e.description
        }
    }
}

/// The back-end side of the vhost-user protocol, one method per request, as rust-vmm's
/// `vhost` crate has it: `RequestDispatcher` decodes each message at its exact size,
/// checks the descriptors it carries and calls the method; a handler sees only decoded
/// payloads and checked descriptors (an eventfd `Notifier`, a sealed, mapped `GuestRegion`).
///
/// `DeviceHandler` implements it for any `VhostUserDevice`; a wrapper of it can change
/// what the back-end does at the protocol level (RingTestSupport's misbehaving peer). A
/// method returns the reply payload, if the request has one; an error is a `Refusal`.
/// All calls come from the connection's control thread.
public protocol VhostUserBackendHandler: AnyObject {
    /// A known request without the REPLY flag arrived, before its payload is decoded.
    /// Descriptors are lent (dup what must outlive the call). Throwing refuses it.
    func requestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) throws(Refusal)

    func getFeatures() throws(Refusal) -> UInt64
    func setFeatures(_ features: UInt64) throws(Refusal)
    func setOwner() throws(Refusal)
    func resetOwner() throws(Refusal)
    func resetDevice() throws(Refusal)
    func getProtocolFeatures() throws(Refusal) -> ProtocolFeatures
    func setProtocolFeatures(_ features: ProtocolFeatures) throws(Refusal)
    func getQueueNum() throws(Refusal) -> UInt64
    func getMaxMemSlots() throws(Refusal) -> UInt64

    /// SET_MEM_TABLE: every region already mapped from its checked memfd.
    func setMemTable(_ regions: [GuestRegion]) throws(Refusal)
    func addMemReg(_ region: GuestRegion) throws(Refusal)
    func remMemReg(_ region: MemoryRegionDescription) throws(Refusal)

    func setVringNum(_ state: VringState) throws(Refusal)
    func setVringBase(_ state: VringState) throws(Refusal)
    func setVringAddr(_ address: VringAddress) throws(Refusal)
    func getVringBase(_ state: VringState) throws(Refusal) -> VringState
    /// SET_VRING_KICK: `kick` is nil when the message said "no descriptor" (polling).
    func setVringKick(_ file: VringFile, _ kick: Notifier?) throws(Refusal)
    func setVringCall(_ file: VringFile, _ call: Notifier?) throws(Refusal)
    func setVringErr(_ file: VringFile, _ err: Notifier?) throws(Refusal)
    func setVringEnable(_ state: VringState) throws(Refusal)

    /// GET_CONFIG of `size` (at least 1) bytes from `offset`: the bytes to send back.
    func getConfig(offset: UInt32, size: Int, flags: UInt32) throws(Refusal) -> [UInt8]
    func setConfig(offset: UInt32, bytes: [UInt8], flags: UInt32) throws(Refusal)
}
