import BlockImage
import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioBlock

/// `Backend.serveQueued`, the fuzzer's way into the back-end: one session over the bytes
/// already queued, ended when they run out, with the connection left open for the next.
@Suite struct ServeQueuedTests {
    let image: String
    let backend: Backend

    init() throws {
        image = NSTemporaryDirectory() + "rf-queued-\(UInt32.random(in: 0...UInt32.max)).img"
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: image))
        var configuration = Backend.Configuration()
        // Long enough that waiting it out would show in every test below.
        configuration.messageDeadline = 30
        configuration.firstMessageDeadline = 30
        configuration.pollInterval = 30
        backend = Backend(
            device: VirtioBlockDevice(image: try DeviceImage(path: image), options: VirtioBlockDeviceOptions()),
            configuration: configuration)
    }

    func reply(on channel: MessageChannel) throws -> Message {
        try channel.receive(until: .after(seconds: 1))
    }

    @Test func servesWhatIsQueuedThenEndsAndTheConnectionStaysOpen() throws {
        defer { unlink(image) }
        let (frontend, backendSide) = try UnixChannel.pair()
        let channel = MessageChannel(frontend)
        for session in 0..<2 {
            try channel.send(Message(.getFeatures))
            try channel.send(Message(.getProtocolFeatures))
            let start = Deadline.now
            #expect(backend.serveQueued(backendSide) == nil, "session \(session)")
            #expect(!Deadline(uptimeNanoseconds: start.uptimeNanoseconds + 5_000_000_000).hasPassed)
            let features = try reply(on: channel)
            #expect(features.header.request == Request.getFeatures.rawValue && features.header.isReply)
            #expect(try U64Payload.decode(features.payload).value & FeatureBits.version1 != 0)
            #expect(try reply(on: channel).header.request == Request.getProtocolFeatures.rawValue)
        }
        // Nothing more was sent: no stray reply, and the socket is still connected.
        #expect(throws: VhostUserError.channel(.timedOut)) { try channel.receive(until: .now) }
        try channel.send(Message(.getFeatures))
        #expect(backend.serveQueued(backendSide) == nil)
        #expect(try reply(on: channel).header.request == Request.getFeatures.rawValue)
    }

    @Test func aMessageLimitEndsTheSessionAndLeavesTheRestQueued() throws {
        defer { unlink(image) }
        let (frontend, backendSide) = try UnixChannel.pair()
        let channel = MessageChannel(frontend)
        for _ in 0..<3 { try channel.send(Message(.getFeatures)) }
        #expect(backend.serveQueued(backendSide, messageLimit: 2) == nil)
        for _ in 0..<2 { #expect(try reply(on: channel).header.request == Request.getFeatures.rawValue) }
        #expect(throws: VhostUserError.channel(.timedOut)) { try channel.receive(until: .now) }
        // The third is still there for the next session.
        #expect(backend.serveQueued(backendSide, messageLimit: 2) == nil)
        #expect(try reply(on: channel).header.request == Request.getFeatures.rawValue)
        #expect(throws: VhostUserError.channel(.timedOut)) { try channel.receive(until: .now) }
    }

    @Test func aMessageCutShortTimesOutAtOnce() throws {
        defer { unlink(image) }
        let (frontend, backendSide) = try UnixChannel.pair()
        // SET_OWNER announcing an 8-byte body of which 4 bytes came.
        let header = MessageHeader(request: Request.setOwner.rawValue, flags: HeaderFlags.version, size: 8)
        try frontend.send(header.encoded + [1, 2, 3, 4])
        let start = Deadline.now
        #expect(backend.serveQueued(backendSide) == .channel(.timedOut))
        // messageDeadline is 30 s: the session did not wait for the rest.
        #expect(!Deadline(uptimeNanoseconds: start.uptimeNanoseconds + 5_000_000_000).hasPassed)
    }

    @Test func aMalformedMessageEndsTheSessionAsServeDoes() throws {
        defer { unlink(image) }
        for serveQueued in [false, true] {
            let (frontend, backendSide) = try UnixChannel.pair()
            try MessageChannel(frontend).send(
                Message(.getFeatures, flags: HeaderFlags.version | HeaderFlags.reply))
            if !serveQueued { frontend.shutdown() }
            let reason = serveQueued ? backend.serveQueued(backendSide) : backend.serve(backendSide)
            #expect(
                reason
                    == .replyFlag(request: Request.getFeatures.rawValue, flags: HeaderFlags.version | HeaderFlags.reply),
                "serveQueued: \(serveQueued)")
        }
    }
}
