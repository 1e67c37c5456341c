import Adversary
import BlockImage
import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// An attacked device (catalogue entry on the real back-end and blk device) and a healthy
/// neighbour in this process; our driver connected to both.
final class AttackBed {
    let dir: String
    let server: AdversaryServer
    let neighbourServer: AdversaryServer
    let neighbour: VirtioBlockDriver

    init(_ name: String?, after: Int? = nil) throws {
        let dir = NSTemporaryDirectory() + "rf-bed-\(getpid())-\(name ?? "none")-\(UInt32.random(in: 0...UInt32.max))"
        self.dir = dir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        func device(_ file: String) throws -> VirtioBlockDevice {
            let path = "\(dir)/\(file).img"
            try Data(count: 4 << 20).write(to: URL(fileURLWithPath: path))
            return VirtioBlockDevice(image: try DeviceImage(path: path), options: VirtioBlockDeviceOptions())
        }
        let attack = try name.map { try #require(Catalogue.attack(named: $0)) }
        let s = AdversaryServer(device: AdversaryDevice(inner: try device("a"), attack: attack, after: after))
        let n = AdversaryServer(device: AdversaryDevice(inner: try device("n"), attack: nil))
        try s.start(socketPath: "\(dir)/a.sock")
        try n.start(socketPath: "\(dir)/n.sock")
        server = s
        neighbourServer = n
        neighbour = try VirtioBlockDriver.connect(socket: "\(dir)/n.sock", options: Self.options(2))
    }

    static func options(_ timeout: Double, packed: Bool = true) -> VirtioBlockDriver.Options {
        var o = VirtioBlockDriver.Options()
        o.requestTimeout = timeout
        o.controlTimeout = 1
        o.packedRing = packed
        return o
    }

    /// Our driver acks VIRTIO_F_RING_PACKED whenever the device offers it (`packed`).
    func connect(timeout: Double = 2, packed: Bool = true) throws(VirtioError) -> VirtioBlockDriver {
        try VirtioBlockDriver.connect(socket: "\(dir)/a.sock", options: Self.options(timeout, packed: packed))
    }

    /// R6: the blast radius is the attacked device only.
    func neighbourStillWorks() throws {
        #expect(DriverProbe.neighbourWorks(neighbour), "a second device of the same process was disturbed")
    }

    deinit {
        neighbour.close()
        server.stop()
        neighbourServer.stop()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// The typed error of `body` (nil on success) and the seconds it took.
func measure(_ body: () throws(VirtioError) -> Void) -> (VirtioError?, Double) {
    let start = monotonicNanoseconds()
    let result = Result<Void, VirtioError>(catching: body)
    let seconds = Double(monotonicNanoseconds() &- start) / 1e9
    if case .failure(let e) = result { return (e, seconds) }
    return (nil, seconds)
}

/// The exact typed outcome of each attack against our driver (ported from the former
/// MisbehavingBlockBackend data-plane tests: the attacks now run through the real device).
@Suite("contained outcomes, exact", .serialized)
struct ContainedOutcomeTests {
    /// Connects, serves `after` good reads, then one 4 KiB read that meets the attack.
    func read(_ name: String, after: Int = 0, timeout: Double = 2) throws -> (
        VirtioError?, Double, VirtioBlockDriver, AttackBed
    ) {
        let bed = try AttackBed(name, after: after)
        let disk = try bed.connect(timeout: timeout)
        for i in 0..<after { _ = try disk.read(at: UInt64(i) * 512, count: 512) }
        let (error, seconds) = measure { () throws(VirtioError) in _ = try disk.read(at: 0, count: 4096) }
        return (error, seconds, disk, bed)
    }

    @Test func usedIdOutOfRangeFailsInFlightReadAndIsSticky() throws {
        let (error, seconds, disk, bed) = try read("used-id-out-of-range")
        #expect(error == .violation(.usedIdOutOfRange(id: 135, queueSize: 128)))
        #expect(error?.rule == .r3)
        #expect(seconds < 2)
        #expect(disk.isBroken)
        #expect(disk.ringFormat == .split, "split attacks are never offered the packed ring")
        #expect(measure { () throws(VirtioError) in _ = try disk.read(at: 0, count: 512) }.0 == error)
        try bed.neighbourStillWorks()
    }

    @Test func usedIdNotInFlightFailsRead() throws {
        let (error, _, _, bed) = try read("used-id-not-in-flight")
        #expect(error == .violation(.usedIdNotInFlight(id: 1)))
        try bed.neighbourStillWorks()
    }

    @Test func duplicateCompletionIsRefused() throws {
        let (error, _, _, bed) = try read("duplicate-completion")
        #expect(error == .violation(.usedIndexBeyondInFlight(lastSeen: 0, published: 2, inFlight: 1)))
        try bed.neighbourStillWorks()
    }

    @Test func usedIndexJumpBeyondInFlightBreaksDevice() throws {
        let (error, _, _, bed) = try read("used-idx-jump")
        #expect(error == .violation(.usedIndexBeyondInFlight(lastSeen: 0, published: 129, inFlight: 1)))
        try bed.neighbourStillWorks()
    }

    @Test func usedIndexGoingBackwardsBreaksDevice() throws {
        let (error, _, _, bed) = try read("used-idx-backwards", after: 1)
        #expect(error == .violation(.usedIndexWentBackwards(lastSeen: 1, published: 0)))
        try bed.neighbourStillWorks()
    }

    @Test func usedLengthOverflowFailsRead() throws {
        let (error, _, _, bed) = try read("used-len-overflow")
        #expect(error == .violation(.usedLengthTooLarge(id: 0, length: 4097 + 4096, writable: 4097)))
        try bed.neighbourStillWorks()
    }

    @Test func usedLengthZeroIsAMissingStatus() throws {
        let (error, _, _, bed) = try read("used-len-zero")
        #expect(error == .deviceViolation(.blockStatusMissing(id: 0)))
        try bed.neighbourStillWorks()
    }

    @Test func statusGarbageIsAViolation() throws {
        let (error, _, _, bed) = try read("status-garbage")
        #expect(error == .deviceViolation(.blockStatusInvalid(status: 0x7f)))
        try bed.neighbourStillWorks()
    }

    @Test func statusIOErrorIsAPlainDeviceError() throws {
        let (error, _, disk, _) = try read("status-ioerr")
        #expect(error == .deviceError(.ioError))
        #expect(!disk.isBroken)
    }

    @Test func statusNeverWrittenLeavesTheInvalidSentinel() throws {
        let (error, _, _, bed) = try read("status-not-written")
        #expect(error == .deviceViolation(.blockStatusInvalid(status: 0xff)))
        try bed.neighbourStillWorks()
    }

    @Test func shortReadWithStatusOkIsAViolation() throws {
        let (error, _, _, bed) = try read("short-read")
        #expect(error == .deviceViolation(.blockShortRead(expected: 4096, got: 0)))
        try bed.neighbourStillWorks()
    }

    @Test func identifierWithoutNulIsBoundedByTwentyBytes() throws {
        let bed = try AttackBed("get-id-without-nul")
        let disk = try bed.connect()
        defer { disk.close() }
        #expect(try disk.identify() == String(repeating: "A", count: 20))
        #expect(!disk.isBroken)
    }

    @Test(arguments: ["vandal-descriptors", "vandal-avail", "vandal-bounce", "config-flapping", "leak-probe"])
    func vandalismChangesNothingTheDriverReads(_ name: String) throws {
        let bed = try AttackBed(name)
        let disk = try bed.connect()
        defer { disk.close() }
        for i in 0..<16 {
            let data = [UInt8](repeating: UInt8(i), count: 1024)
            try disk.write(at: UInt64(i) * 1024, bytes: data)
            #expect(try disk.read(at: UInt64(i) * 1024, count: 1024) == data)
        }
        #expect(!disk.isBroken)
    }

    @Test func closingMidIOFailsInFlightRequestWithDisconnected() throws {
        let (error, seconds, _, bed) = try read("close-mid-io")
        #expect(error == .disconnected("back-end closed the vhost-user socket"))
        #expect(seconds < 2)
        try bed.neighbourStillWorks()
    }

    @Test(.timeLimit(.minutes(1)), arguments: ["never-complete", "kick-ignored", "complete-after-deadline"])
    func silentDeviceTimesOutAndBreaks(_ name: String) throws {
        let (error, seconds, disk, bed) = try read(name, timeout: 0.3)
        #expect(error == .timeout(milliseconds: 300))
        #expect(error?.rule == .r5)
        #expect(seconds >= 0.29 && seconds < 1.5)
        #expect(disk.isBroken)
        try bed.neighbourStillWorks()
    }

    @Test func notificationStormIsBackedOffAndTheRequestCompletes() throws {
        let bed = try AttackBed("notification-storm")
        let disk = try bed.connect(timeout: 5)
        defer { disk.close() }
        let (error, seconds) = measure { () throws(VirtioError) in _ = try disk.read(at: 0, count: 512) }
        #expect(error == nil)
        #expect(seconds < 5)
        #expect(bed.server.device.observations.notificationsSent == 250_000)
        // What only the backoff bounds: the device's 250 000 calls without a completion
        // wake the driver up for nothing; without the pauses, every few microseconds.
        let spurious = disk.queue(0).statistics.spuriousNotifications
        let bound = WakeBackoff.mostSpuriousWakeUps(in: seconds)
        #expect(spurious > WakeBackoff.threshold, "the storm reached the backoff")
        #expect(spurious <= UInt64(2 * bound), "\(spurious) wake-ups without work in \(seconds) s (bound \(bound))")
        try bed.neighbourStillWorks()
    }

    @Test func memfdResizeIsRefusedBySeals() throws {
        let bed = try AttackBed("memfd-resize")
        let disk = try bed.connect()
        defer { disk.close() }
        #expect(bed.server.device.observations.truncateErrno == [EPERM, EPERM])
        try disk.write(at: 0, bytes: [UInt8](repeating: 1, count: 512))
        #expect(try disk.read(at: 0, count: 512) == [UInt8](repeating: 1, count: 512))
    }

    @Test func configLiesAreRefusedOrClamped() throws {
        let capacity = try AttackBed("config-capacity-2^63")
        #expect(
            measure { () throws(VirtioError) in _ = try capacity.connect() }.0
                == .deviceViolation(.blockConfigInvalid(field: "capacity", value: 1 << 63)))
        try capacity.neighbourStillWorks()
        for (name, value) in [
            ("config-blk-size-0", UInt64(0)), ("config-blk-size-3", 3), ("config-blk-size-2^31", 1 << 31),
        ] {
            let bed = try AttackBed(name)
            #expect(
                measure { () throws(VirtioError) in _ = try bed.connect() }.0
                    == .deviceViolation(.blockConfigInvalid(field: "blk_size", value: value)))
        }
        let seg = try AttackBed("config-seg-max-0")
        let disk = try seg.connect()
        defer { disk.close() }
        #expect(disk.info.segmentsPerRequest == 1)
        try disk.write(at: 0, bytes: [UInt8](repeating: 9, count: 8192))
        for name in ["config-num-queues-0", "config-num-queues-65535"] {
            let bed = try AttackBed(name)
            let d = try bed.connect()
            #expect(d.info.queueCount == 1)
            d.close()
        }
    }

    // MARK: control plane (exact errors)

    func connectError(_ name: String) throws -> (VirtioError?, Double, AttackBed) {
        let bed = try AttackBed(name)
        let (error, seconds) = measure { () throws(VirtioError) in try bed.connect().close() }
        return (error, seconds, bed)
    }

    @Test func controlReplyLiesAreRefusedWithTheExactError() throws {
        func protocolError(_ e: VhostUserError) -> VirtioError { .deviceViolation(.controlProtocol(e.description)) }
        let cases: [(String, VirtioError)] = [
            ("reply-short", protocolError(.payloadSize(expected: 8, got: 4))),
            ("reply-oversized", protocolError(.payloadSize(expected: 72, got: 80))),
            ("reply-size-0xffffff", protocolError(.sizeTooLarge(request: 17, size: 0xff_ffff, limit: 8))),
            ("reply-wrong-code", protocolError(.unexpectedReply(expected: .getProtocolFeatures, got: 17))),
            ("reply-with-fd", protocolError(.descriptorCount(request: .getFeatures, expected: "0", got: 1))),
            ("reply-nack", protocolError(.nack(request: .setMemTable, status: 1))),
            ("no-version-1", .unsupported("VIRTIO_F_VERSION_1")),
        ]
        for (name, expected) in cases {
            let (error, seconds, bed) = try connectError(name)
            #expect(error == expected, "\(name)")
            #expect(seconds < 1, "\(name): refused at once")
            try bed.neighbourStillWorks()
        }
    }

    @Test func replyNeverSentTimesOut() throws {
        let (error, seconds, bed) = try connectError("reply-never")
        #expect(error == .timeout(milliseconds: 1000))
        #expect(seconds >= 0.99 && seconds < 2)
        try bed.neighbourStillWorks()
    }

    @Test func unofferedFeatureBitsAreNotAcked() throws {
        let bed = try AttackBed("unoffered-features")
        let disk = try bed.connect()
        defer { disk.close() }
        #expect(!disk.isBroken)
        let acked = bed.server.device.observations.notes.first { $0.hasPrefix("driver acked") }
        #expect(acked != nil)
    }
}
