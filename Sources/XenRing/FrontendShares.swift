import SharedMemory

/// What a frontend shares with its backend (blkif and netif alike): the grant table, the
/// frames it grants from, and one eventfd each way. Created before the handshake and
/// announced with the frontend's node; the backend maps and adopts them (R1, §4.1).
struct FrontendShares {
    let table: SharedRegion
    let frames: SharedRegion
    let toBack: Notifier
    let fromBack: Notifier
    let memory: GrantTableMemory

    /// Fresh, zero-filled sealed memfds (`label` names them) and two eventfds.
    init(label: String, grantEntries: Int, frameCount: Int) throws(XenConnectError) {
        do {
            table = try SharedRegion(name: "\(label)-grant-table", size: grantEntries * GrantLayout.entrySize)
            frames = try SharedRegion(name: "\(label)-frames", size: frameCount * SharedRingLayout.pageSize)
            toBack = try Notifier()
            fromBack = try Notifier()
        } catch { throw .setup("\(error)") }
        memory = GrantTableMemory(
            entries: table.base, entryCount: grantEntries, frames: frames.base, frameCount: frameCount)
    }

    /// Sends `node` with the four descriptors and waits for the backend to answer
    /// Connected; anything else is a handshake violation.
    func announce(_ node: XenStoreNode, on channel: UnixChannel, until deadline: Deadline) throws(XenConnectError) {
        try channel.sendNode(
            node,
            descriptors: [table.fileDescriptor, frames.fileDescriptor, toBack.fileDescriptor, fromBack.fileDescriptor],
            until: deadline)
        let (reply, _) = try channel.receiveNode(maxDescriptors: 0, until: deadline)
        let state: XenbusState
        do { state = try reply.state() } catch { throw .violation(error) }
        guard state == .connected else {
            throw .violation(.xenHandshakeState(expected: XenbusState.connected.rawValue, got: state.rawValue))
        }
    }

    /// The frontend's event channel over the two eventfds.
    var events: EventChannel { EventChannel(incoming: fromBack, outgoing: toBack) }
}
