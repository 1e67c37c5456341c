import CRingFence
import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// A malicious driver on the control plane. A well-formed but unacceptable request is
/// refused honestly under REPLY_ACK (status != 0) and the connection goes on; a malformed
/// message drops the connection. Either way the server then serves a good front-end.
@Suite(.serialized) struct ControlAttackTests {
    typealias F = TestFrontend

    static func wholeRegion() -> [UInt8] {
        F.memoryTable([(F.guestBase, UInt64(F.regionSize), F.userBase, 0)])
    }

    @Test(arguments: [UInt32(0), 3, 65536, 0xffff_ffff])
    func badVringNumIsRefused(num: UInt32) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        #expect(try f.acked(.setVringNum, VringState(index: 0, num: num).encoded) != 0)
        // The connection survives an honest refusal and accepts a good value.
        #expect(try f.acked(.setVringNum, VringState(index: 0, num: 8).encoded) == 0)
        // Without NEED_REPLY the front-end would believe it worked: drop instead.
        try f.send(.setVringNum, VringState(index: 0, num: num).encoded)
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test(arguments: [UInt32(0x10000), 0xffff_ffff])
    func vringBaseBeyondIndexRangeIsRefused(base: UInt32) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        #expect(try f.acked(.setVringBase, VringState(index: 0, num: base).encoded) != 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func vringIndexBeyondQueueCountIsRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        #expect(try f.acked(.setVringNum, VringState(index: 1, num: 8).encoded) != 0)
        #expect(try f.acked(.setVringEnable, VringState(index: 255, num: 1).encoded) != 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func vringAddressOutsideMemoryIsRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        #expect(try f.acked(.setMemTable, Self.wholeRegion(), fds: [f.region.fileDescriptor]) == 0)
        #expect(try f.acked(.setVringNum, VringState(index: 0, num: 256).encoded) == 0)
        let user = F.userBase
        for bad in [
            VringAddress(
                index: 0, descriptor: user + UInt64(F.regionSize) - 64, used: user + 0x2000, avail: user + 0x1000),
            VringAddress(index: 0, descriptor: 0, used: user + 0x2000, avail: user + 0x1000),
            VringAddress(index: 0, descriptor: user + 8, used: user + 0x2000, avail: user + 0x1000),  // misaligned
            VringAddress(index: 0, descriptor: .max - 15, used: user + 0x2000, avail: user + 0x1000),
        ] {
            #expect(try f.acked(.setVringAddr, bad.encoded) != 0)
        }
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func nineRegionsDropConnection() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        let regions = (0..<9).map { i in
            (F.guestBase + UInt64(i) * 0x10000, UInt64(0x10000), F.userBase + UInt64(i) * 0x10000, UInt64(i) * 0x10000)
        }
        try f.send(
            .setMemTable, F.memoryTable(regions), fds: [Int32](repeating: f.region.fileDescriptor, count: 8),
            needReply: true)
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func ninthAddedRegionIsRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        for i in 0..<9 {
            let r = MemoryRegionDescription(
                guestAddress: F.guestBase + UInt64(i) * 0x10000, size: 0x10000,
                userAddress: F.userBase + UInt64(i) * 0x10000, mmapOffset: UInt64(i) * 0x10000)
            let status = try f.acked(.addMemReg, SingleMemoryRegion(r).encoded, fds: [f.region.fileDescriptor])
            #expect((status == 0) == (i < 8), "region \(i)")
        }
        // Removing one makes room again.
        let first = MemoryRegionDescription(
            guestAddress: F.guestBase, size: 0x10000, userAddress: F.userBase, mmapOffset: 0)
        #expect(try f.acked(.remMemReg, SingleMemoryRegion(first).encoded) == 0)
        #expect(try f.acked(.remMemReg, SingleMemoryRegion(first).encoded) != 0, "already removed")
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func overlappingRegionsAreRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        let fd = f.region.fileDescriptor
        let guestOverlap = F.memoryTable([
            (F.guestBase, 0x20000, F.userBase, 0), (F.guestBase + 0x10000, 0x20000, F.userBase + 0x40000, 0),
        ])
        #expect(try f.acked(.setMemTable, guestOverlap, fds: [fd, fd]) != 0)
        let userOverlap = F.memoryTable([
            (F.guestBase, 0x20000, F.userBase, 0), (F.guestBase + 0x40000, 0x20000, F.userBase + 0x10000, 0),
        ])
        #expect(try f.acked(.setMemTable, userOverlap, fds: [fd, fd]) != 0)
        let wraps = F.memoryTable([(UInt64.max - 0xfff, 0x2000, F.userBase, 0)])
        #expect(try f.acked(.setMemTable, wraps, fds: [fd]) != 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func descriptorSmallerThanRegionIsRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        let big = F.memoryTable([(F.guestBase, UInt64(F.regionSize) * 2, F.userBase, 0)])
        #expect(try f.acked(.setMemTable, big, fds: [f.region.fileDescriptor]) != 0)
        let offset = F.memoryTable([(F.guestBase, UInt64(F.regionSize), F.userBase, 4096)])
        #expect(try f.acked(.setMemTable, offset, fds: [f.region.fileDescriptor]) != 0)
        let huge = F.memoryTable([(F.guestBase, .max, F.userBase, 0)])
        #expect(try f.acked(.setMemTable, huge, fds: [f.region.fileDescriptor]) != 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    /// An unsealed memfd could be truncated later to SIGBUS the device (docs/design.md §4.1).
    @Test func unsealedMemfdIsRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        let fd = rf_memfd_create("unsealed", RF_MFD_CLOEXEC)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(ftruncate(fd, off_t(F.regionSize)) == 0)
        #expect(try f.acked(.setMemTable, Self.wholeRegion(), fds: [fd]) != 0)
        let r = MemoryRegionDescription(
            guestAddress: F.guestBase, size: UInt64(F.regionSize), userAddress: F.userBase, mmapOffset: 0)
        #expect(try f.acked(.addMemReg, SingleMemoryRegion(r).encoded, fds: [fd]) != 0)
        // A regular file is not a memfd at all: no seals, refused the same way.
        let file = open(fixture.imagePath, O_RDWR)
        defer { close(file) }
        #expect(try f.acked(.addMemReg, SingleMemoryRegion(r).encoded, fds: [file]) != 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test(arguments: [
        (Request.setVringNum, 4), (.setVringAddr, 39), (.setFeatures, 7), (.setMemTable, 8 + 31),
        (.addMemReg, 32), (.getConfig, 11), (.getFeatures, 3),
    ])
    func truncatedPayloadDropsConnection(request: Request, size: Int) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        var payload = [UInt8](repeating: 0, count: size)
        if request == .setMemTable { payload[0] = 1 }
        let fds = request == .setMemTable || request == .addMemReg ? [f.region.fileDescriptor] : []
        try f.send(request.rawValue, payload: payload, fds: fds, needReply: true)
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test(arguments: [UInt32(0xffff_ffff), 0x00ff_ffff, 4097])
    func hugeSizeFieldDropsConnectionWithoutReadingBody(size: UInt32) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        try f.send(Request.setVringNum.rawValue, payload: [], size: size)
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func unknownRequestCodeIsRefusedOrDropped() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        for code: UInt32 in [0, 26, 999, 0xffff_ffff] {
            try f.send(code, payload: [1, 2, 3, 4], needReply: true)
            let reply = try f.receive()
            #expect(reply.header.request == code && reply.header.isReply)
            #expect(try U64Payload.decode(reply.payload).value != 0)
        }
        // Known to the codec but never offered: refused too.
        #expect(try f.acked(.setLogBase, U64Payload(0).encoded) != 0)
        try f.send(999, payload: [])
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test(arguments: ["kick", "call", "memTable", "addMemReg"])
    func missingDescriptorDropsConnection(kind: String) throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        switch kind {
        case "kick": try f.send(.setVringKick, VringFile(index: 0).encoded, needReply: true)
        case "call": try f.send(.setVringCall, VringFile(index: 0).encoded, needReply: true)
        case "memTable": try f.send(.setMemTable, Self.wholeRegion(), needReply: true)
        default:
            let r = MemoryRegionDescription(
                guestAddress: F.guestBase, size: 4096, userAddress: F.userBase, mmapOffset: 0)
            try f.send(.addMemReg, SingleMemoryRegion(r).encoded, needReply: true)
        }
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    /// Descriptors where none belong are closed, and the connection dropped.
    @Test func surplusDescriptorsAreClosedAndDropConnection() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let before = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count
        do {
            let f = try TestFrontend(path: fixture.socketPath)
            try f.negotiate()
            let extra = try Notifier()
            try f.send(.getFeatures, fds: [extra.fileDescriptor, extra.fileDescriptor])
            #expect(f.isDropped())
            let g = try TestFrontend(path: fixture.socketPath)
            try g.negotiate()
            try g.send(
                .setVringKick, VringFile(index: 0, noDescriptor: true).encoded, fds: [extra.fileDescriptor],
                needReply: true)
            #expect(g.isDropped())
        }
        #expect(fixture.waitForEvent(containing: "#2 disconnected"))
        let after = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count
        #expect(after <= before, "no descriptor leaked")
        try fixture.expectServesWellBehavedFrontend()
    }

    /// An always-readable kick (a pipe with data, a regular file) would make the queue
    /// thread spin: only eventfds are accepted for kick, call and err.
    @Test func kickDescriptorThatIsNotAnEventfdIsRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        var pipeFDs: [Int32] = [-1, -1]
        #expect(pipe(&pipeFDs) == 0)
        defer {
            close(pipeFDs[0])
            close(pipeFDs[1])
        }
        let file = open(fixture.imagePath, O_RDONLY)
        defer { close(file) }
        for fd in [pipeFDs[0], file, f.region.fileDescriptor] {
            #expect(try f.acked(.setVringKick, VringFile(index: 0).encoded, fds: [fd]) != 0)
            #expect(try f.acked(.setVringCall, VringFile(index: 0).encoded, fds: [fd]) != 0)
        }
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    /// R5: a front-end that floods requests and never reads the replies fills the socket;
    /// the reply then times out and the connection is dropped (no thread blocked forever).
    @Test func frontendThatNeverReadsRepliesIsDropped() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.channel.channel.setNonBlocking()
        let request = MessageHeader(request: Request.getFeatures.rawValue, flags: HeaderFlags.version, size: 0).encoded
        let burst = [UInt8]((0..<256).flatMap { _ in request })
        var sentBursts = 0
        do {
            while sentBursts < 100_000 {
                try f.channel.channel.send(burst, until: .after(seconds: 0.5))
                sentBursts += 1
            }
        } catch {
            // The back-end stopped reading: either blocked on its reply (until the deadline)
            // or gone. Both are fine; what matters is what follows.
        }
        #expect(fixture.waitForEvent(containing: "#1 disconnected", seconds: 5))
        #expect(fixture.eventLog().contains { $0.contains("timed out") })
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    /// R5: connecting and saying nothing must not hold the one serving slot forever.
    @Test func silentFrontendIsDroppedAtFirstMessageDeadline() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        #expect(f.isDropped())
        #expect(fixture.waitForEvent(containing: "no message within"))
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func requestWithReplyFlagDropsConnection() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        let header = MessageHeader(
            request: Request.getFeatures.rawValue, flags: HeaderFlags.version | HeaderFlags.reply, size: 0)
        try f.channel.channel.send(header.encoded)
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func badVersionDropsConnection() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.channel.channel.send(MessageHeader(request: 1, flags: 2, size: 0).encoded)
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    /// R5: a front-end that sends half a message and stalls is dropped at the deadline.
    @Test func stalledHalfMessageIsDroppedAtDeadline() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.channel.channel.send(Array(MessageHeader(request: 8, flags: 1, size: 8).encoded) + [8, 0])
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func unofferedFeaturesAreRefused() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.send(.setProtocolFeatures, U64Payload(ProtocolFeatures.replyAck.rawValue).encoded)
        // Not offered (packed is, since issue 7).
        #expect(try f.acked(.setFeatures, U64Payload(FeatureBits.accessPlatform).encoded) != 0)
        #expect(try f.acked(.setProtocolFeatures, U64Payload(1 << 40).encoded) != 0)
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    @Test func configSpaceIsServedAndBounded() throws {
        let fixture = try BackendFixture()
        defer { fixture.shutdown() }
        let f = try TestFrontend(path: fixture.socketPath)
        try f.negotiate()
        let reply = try ConfigSpace.decode(
            try f.query(.getConfig, ConfigSpace(payload: [UInt8](repeating: 0, count: 60)).encoded))
        let config = BlockConfig.decode(reply.payload)
        #expect(config.capacity == UInt64(BackendFixture.imageSize / 512))
        #expect(config.blockSize == 512 && config.numQueues == 1 && config.segMax == 254)
        // 257 bytes of config: above VHOST_USER_MAX_CONFIG_SIZE, the connection is dropped.
        try f.send(.getConfig, U32(0) + U32(257) + U32(0) + [UInt8](repeating: 0, count: 257))
        #expect(f.isDropped())
        try fixture.expectServesWellBehavedFrontend(after: f)
    }

    private func U32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
}
