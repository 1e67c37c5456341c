#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import Testing
import VhostUser

/// The protocol layer without a socket: what reaches a handler, and which answer a
/// refusal gets (R3, R4, §4.1).
@Suite struct RequestDispatcherTests {
    /// Records the calls that got through; refuses SET_VRING_NUM.
    final class Recorder: VhostUserBackendHandler {
        var calls: [String] = []
        func requestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) {}
        func getFeatures() -> UInt64 { 7 }
        func setFeatures(_ features: UInt64) { calls.append("setFeatures \(features)") }
        func setOwner() {}
        func resetOwner() {}
        func resetDevice() {}
        func getProtocolFeatures() -> ProtocolFeatures { .replyAck }
        func setProtocolFeatures(_ features: ProtocolFeatures) {}
        func getQueueNum() -> UInt64 { 1 }
        func getMaxMemSlots() -> UInt64 { 8 }
        func setMemTable(_ regions: [GuestRegion]) { calls.append("setMemTable \(regions.count)") }
        func addMemReg(_ region: GuestRegion) {}
        func remMemReg(_ region: MemoryRegionDescription) {}
        func setVringNum(_ state: VringState) throws(Refusal) { throw .refused("no") }
        func setVringBase(_ state: VringState) {}
        func setVringAddr(_ address: VringAddress) {}
        func getVringBase(_ state: VringState) throws(Refusal) -> VringState { throw .refused("no") }
        func setVringKick(_ file: VringFile, _ kick: Notifier?) { calls.append("kick \(kick != nil)") }
        func setVringCall(_ file: VringFile, _ call: Notifier?) {}
        func setVringErr(_ file: VringFile, _ err: Notifier?) {}
        func setVringEnable(_ state: VringState) {}
        func getConfig(offset: UInt32, size: Int, flags: UInt32) -> [UInt8] { [UInt8](repeating: 1, count: size) }
        func setConfig(offset: UInt32, bytes: [UInt8], flags: UInt32) {}
    }

    func message(_ r: Request, _ payload: [UInt8] = [], needsReply: Bool = false, fds: [Int32] = []) -> Message {
        Message(
            r, flags: HeaderFlags.version | (needsReply ? HeaderFlags.needReply : 0), payload: payload, descriptors: fds
        )
    }

    func isDrop(_ o: DispatchOutcome) -> Bool {
        if case .drop = o { return true }
        return false
    }

    @Test func refusalIsAnsweredOnlyUnderReplyAck() {
        let h = Recorder()
        var d = RequestDispatcher()
        let num = VringState(index: 0, num: 3).encoded
        #expect(isDrop(d.dispatch(message(.setVringNum, num, needsReply: true), to: h)))
        _ = d.dispatch(message(.setProtocolFeatures, U64Payload(ProtocolFeatures.replyAck.rawValue).encoded), to: h)
        guard case .nack(let failure, "no") = d.dispatch(message(.setVringNum, num, needsReply: true), to: h) else {
            Issue.record("a refusal under REPLY_ACK is answered")
            return
        }
        #expect(failure.payload == U64Payload(1).encoded && failure.header.isReply)
        // A request whose reply is its payload cannot say no: dropped.
        #expect(isDrop(d.dispatch(message(.getVringBase, num, needsReply: true), to: h)))
    }

    @Test func descriptorsAreCountedCheckedAndClosed() throws {
        let h = Recorder()
        var d = RequestDispatcher()
        // One eventfd where none belongs: malformed, dropped, and closed.
        let stray = try Notifier()
        let fd = dup(stray.fileDescriptor)
        #expect(isDrop(d.dispatch(message(.setFeatures, U64Payload(1).encoded, fds: [fd]), to: h)))
        #expect(fcntl(fd, F_GETFD) == -1, "a descriptor not handed on is closed")
        // A pipe as kick: refused before the handler sees it.
        var p: [Int32] = [-1, -1]
        #expect(pipe(&p) == 0)
        close(p[1])
        #expect(isDrop(d.dispatch(message(.setVringKick, VringFile(index: 0).encoded, fds: [p[0]]), to: h)))
        // An eventfd is handed on as a Notifier; "no descriptor" as nil.
        _ = d.dispatch(message(.setVringKick, VringFile(index: 0).encoded, fds: [dup(stray.fileDescriptor)]), to: h)
        _ = d.dispatch(message(.setVringKick, VringFile(index: 0, noDescriptor: true).encoded), to: h)
        #expect(h.calls == ["kick true", "kick false"])
    }

    @Test func repliesCarryTheHandlersAnswer() {
        let h = Recorder()
        var d = RequestDispatcher()
        guard case .reply(let r, .getFeatures) = d.dispatch(message(.getFeatures), to: h) else {
            Issue.record("GET_FEATURES has a reply")
            return
        }
        #expect(r.payload == U64Payload(7).encoded)
        let ask = ConfigSpace(offset: 4, payload: [0, 0]).encoded
        guard case .reply(let c, .getConfig) = d.dispatch(message(.getConfig, ask), to: h) else {
            Issue.record("GET_CONFIG has a reply")
            return
        }
        #expect(c.payload == ConfigSpace(offset: 4, payload: [1, 1]).encoded)
        #expect(isDrop(d.dispatch(message(.getFeatures, [1, 2, 3]), to: h)), "a body where none belongs")
        #expect(h.calls.isEmpty)
    }
}
