#if canImport(Glibc)
import Glibc
#endif
import BlockImage
import Foundation
import Synchronization
public import SharedMemory
import Virtqueue
public import VhostUser
public import VirtioBlock

/// What a `MisbehavingBlockBackend` does wrong. Only what the real back-end's hooks
/// cannot express lives here; every other attack is in the `Adversary` catalogue, run
/// through the real `Backend` and blk device (`AdversaryDevice`).
public enum BlockMisbehaviour: Sendable, Equatable {
    case none
    /// Acks 0, then hangs up: the next request is answered by closing the socket (what
    /// libvhost-user does on failure).
    case ackThenClose(Request)
    /// Speaks first on the control socket (a back-end never may without BACKEND_REQ; the
    /// real back-end only ever answers, so no hook can do this).
    case unsolicitedMessage
    /// Answers this request, then stops serving the control socket (the next message is
    /// the last one read; the socket stays open): the driver's sends fill it and its
    /// replies never come.
    case deafAfter(Request)
}

/// A configurable vhost-user-blk peer for driver unit tests, in a thread of the test
/// process: the real `Backend` and `VirtioBlockDevice` on a private scratch image, served
/// through `MisbehavingHandler` (protocol-level misbehaviours and the offered protocol
/// features), `MisbehavingBlockDevice` (any config, features, queue count) and
/// `MisbehavingQueueHandler` (speaking unasked). Not a second back-end: every check and
/// every reply path is the one `serve-blk` ships.
public final class MisbehavingBlockBackend: @unchecked Sendable {
    // @unchecked Sendable: the identity (`config`, `features`, `queueNum`,
    // `protocolFeatures`) is set by the test before `start()` and only read after it; what
    // the serving thread changes is in `state`, `backend`, `sharedRegions` (mutexes) and
    // atomics (test support).
    public let misbehaviour: BlockMisbehaviour
    /// Requests served correctly before the data-plane misbehaviour starts.
    public let after: Int
    public var config: BlockConfig
    /// Offered as they are (GET_FEATURES); the framework adds nothing.
    public var features: UInt64
    public var queueNum: UInt64
    /// What GET_PROTOCOL_FEATURES offers.
    public var protocolFeatures: ProtocolFeatures = [.replyAck, .config, .multiQueue, .backendRequest, .hostNotifier]
    public let driverChannel: UnixChannel
    /// The back-end's end of the socket pair (`unsolicitedMessage` speaks on it).
    let channel: UnixChannel
    let image: DeviceImage
    let stopped = Atomic<Bool>(false)
    let holding = Atomic<Bool>(false)
    let state = Locked<Report>(Report())
    /// The driver's shared memory as last announced (kept mapped for the leak probe).
    let sharedRegions = Locked<[GuestRegion]>([])
    let backend = Locked<Backend?>(nil)

    /// What the back-end observed (for assertions).
    public struct Report: Sendable {
        public var requestsServed = 0
        public var finished = false
    }

    public var report: Report { state.withLock { $0 } }

    public static func defaultConfig(capacityBytes: UInt64 = 1 << 20) -> BlockConfig {
        var c = BlockConfig()
        c.capacity = capacityBytes / 512
        c.segMax = 8
        c.blockSize = 512
        c.numQueues = 2
        c.maxDiscardSectors = 2048
        c.maxDiscardSegments = 1
        c.maxWriteZeroesSectors = 2048
        c.maxWriteZeroesSegments = 1
        return c
    }

    public static let defaultFeatures: UInt64 =
        FeatureBits.version1 | FeatureBits.protocolFeatures | FeatureBits.ringEventIndex
        | BlockProtocol.Feature.segMax | BlockProtocol.Feature.blockSize | BlockProtocol.Feature.flush
        | BlockProtocol.Feature.multiQueue | BlockProtocol.Feature.discard | BlockProtocol.Feature.writeZeroes

    public init(
        _ misbehaviour: BlockMisbehaviour = .none, after: Int = 0,
        config: BlockConfig = MisbehavingBlockBackend.defaultConfig(),
        features: UInt64 = MisbehavingBlockBackend.defaultFeatures, queueNum: UInt64 = 2
    ) throws {
        self.misbehaviour = misbehaviour
        self.after = after
        self.config = config
        self.features = features
        self.queueNum = queueNum
        let (a, b) = try UnixChannel.pair()
        driverChannel = a
        channel = b
        image = try Self.scratchImage(bytes: Int(max(1, min(config.capacity, 1 << 13))) * 512)
    }

    /// A private image file, unlinked once open (the device keeps its descriptor).
    static func scratchImage(bytes: Int) throws -> DeviceImage {
        let path = FileManager.default.temporaryDirectory
            .appendingPathComponent("misbehaving-blk-\(UUID().uuidString).img").path
        guard FileManager.default.createFile(atPath: path, contents: nil), truncate(path, off_t(bytes)) == 0 else {
            throw SystemError.current("creating \(path)")
        }
        defer { unlink(path) }
        return try DeviceImage(path: path)
    }

    /// Starts serving on a thread of its own (one connection: the driver's).
    public func start() {
        var options = VirtioBlockDeviceOptions()
        options.serial = "misbehaving-blk"
        options.queueCount = Int(max(1, min(queueNum, 64)))
        options.readOnly = features & BlockProtocol.Feature.readOnly != 0
        let device = MisbehavingBlockDevice(inner: VirtioBlockDevice(image: image, options: options), peer: self)
        let backend = Backend(device: device, handler: { [self] in MisbehavingHandler(inner: $0, peer: self) })
        self.backend.withLock { $0 = backend }
        let t = Thread { [self] in
            backend.serve(channel)
            self.backend.withLock { $0 = nil }
            state.withLock { $0.finished = true }
        }
        t.start()
    }

    public func stop() {
        stopped.store(true, ordering: .releasing)
        backend.withLock { $0?.stop() }
        channel.shutdown()
    }

    var isStopped: Bool { stopped.load(ordering: .acquiring) }

    /// While `true`, the device leaves every request on the ring unserved (a device that
    /// completes late); once `false` again it serves them within its idle tick (1 s).
    public func holdRequests(_ hold: Bool) { holding.store(hold, ordering: .releasing) }

    var isHolding: Bool { holding.load(ordering: .acquiring) }

    /// A copy of every byte the driver shared (the leak probe: whatever the driver keeps
    /// private must never show up here).
    public func snapshotSharedMemory() -> [UInt8] {
        sharedRegions.withLock { regions in
            var bytes: [UInt8] = []
            for r in regions { bytes += Array(UnsafeRawBufferPointer(r.mapping.bytes)) }
            return bytes
        }
    }

    func noteServed(_ count: Int) { state.withLock { $0.requestsServed += count } }

    /// `unsolicitedMessage`: a GET_FEATURES request from the back-end, which never may.
    func speakUnasked() {
        try? MessageChannel(channel).send(Message(.getFeatures, flags: HeaderFlags.version), until: .after(seconds: 1))
    }
}
