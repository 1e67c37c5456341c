import Foundation
import RingHarness
import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// A healthy in-process back-end and device, kept open across each attack: the blast
/// radius of a misbehaving device must be that device only (R6).
final class Neighbour {
    let backend: MisbehavingBlockBackend
    let disk: BlockDevice

    init() throws {
        backend = try MisbehavingBlockBackend()
        disk = try attach(backend)
    }

    func stillWorks() throws {
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try disk.write(at: 8192, bytes: pattern)
        #expect(try disk.read(at: 8192, count: 4096) == pattern)
        #expect(!disk.isBroken)
    }

    deinit {
        disk.close()
        backend.stop()
    }
}

func attach(_ backend: MisbehavingBlockBackend, timeout: Double = 2, queues: Int = 1) throws(VirtioError) -> BlockDevice {
    backend.start()
    var options = BlockDevice.Options()
    options.requestTimeout = timeout
    options.controlTimeout = 1
    options.queues = queues
    return try BlockDevice.connect(channel: backend.driverChannel, options: options)
}

/// CPU time of the calling thread (user + system).
func threadCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(__rusage_who_t(1), &usage)  // RUSAGE_THREAD (not exported to Swift)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec)
        + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
}

/// Runs `body`, returns its VirtioError (nil if it succeeded) and the seconds it took.
func failure(_ body: () throws(VirtioError) -> Void) -> (VirtioError?, Double) {
    let start = monotonicNanoseconds()
    do throws(VirtioError) {
        try body()
        return (nil, Double(monotonicNanoseconds() - start) / 1e9)
    } catch {
        return (error, Double(monotonicNanoseconds() - start) / 1e9)
    }
}

/// One read against a back-end misbehaving with `m`: returns the error it must produce.
func readAgainst(_ m: BlockMisbehaviour, after: Int = 0, timeout: Double = 2) throws -> (VirtioError?, Double, BlockDevice, MisbehavingBlockBackend) {
    let backend = try MisbehavingBlockBackend(m, after: after)
    let disk = try attach(backend, timeout: timeout)
    for i in 0..<after { _ = try disk.read(at: UInt64(i) * 512, count: 512) }
    let (error, seconds) = failure { () throws(VirtioError) in _ = try disk.read(at: 0, count: 4096) }
    return (error, seconds, disk, backend)
}

@Suite("misbehaving vhost-user-blk back-end", .serialized)
struct MisbehavingBackendTests {
    @Test func healthyBackendServesEveryRequestType() async throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        let data = (0..<65536).map { UInt8(truncatingIfNeeded: $0 ^ ($0 >> 8)) }
        try await disk.write(at: 4096, bytes: data)
        #expect(try await disk.read(at: 4096, count: data.count) == data)
        try await disk.flush()
        try disk.discard(at: 0, length: 4096)
        try disk.writeZeroes(at: 0, length: 4096)
        #expect(try await disk.identify() == "misbehaving-blk")
        #expect(disk.info.capacityBytes == 1 << 20)
    }

    @Test func usedIdOutOfRangeFailsInFlightRead() throws {
        let neighbour = try Neighbour()
        let (error, seconds, disk, backend) = try readAgainst(.usedIdOutOfRange)
        defer { backend.stop() }
        #expect(error == .violation(.usedIdOutOfRange(id: 135, queueSize: 128)))
        #expect(error?.rule == .r3)
        #expect(seconds < 2)
        #expect(disk.isBroken)
        // Sticky: the next request fails with the same violation (R6).
        #expect(failure { () throws(VirtioError) in _ = try disk.read(at: 0, count: 512) }.0 == error)
        try neighbour.stillWorks()
    }

    @Test func usedIdNotInFlightFailsRead() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.usedIdNotInFlight)
        defer { backend.stop() }
        guard case .violation(.usedIdNotInFlight)? = error else {
            Issue.record("expected usedIdNotInFlight, got \(String(describing: error))")
            return
        }
        try neighbour.stillWorks()
    }

    @Test func duplicateCompletionIsRefused() throws {
        let neighbour = try Neighbour()
        let backend = try MisbehavingBlockBackend(.duplicateCompletion)
        let disk = try attach(backend)
        defer { backend.stop() }
        let q = disk.queue(0)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 64)
        defer { buffer.deallocate() }
        try q.submitRead(offset: 0, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<512]), tag: 1)
        try q.submitRead(offset: 512, into: UnsafeMutableRawBufferPointer(rebasing: buffer[512..<1024]), tag: 2)
        let first = q.wait()
        let second = q.wait()
        #expect(first?.result == .success(512))
        guard case .failure(.violation(.usedIdNotInFlight))? = second?.result else {
            Issue.record("expected usedIdNotInFlight, got \(String(describing: second))")
            return
        }
        #expect(q.wait() == nil)
        try neighbour.stillWorks()
    }

    @Test func usedIndexJumpBeyondInFlightBreaksDevice() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.usedIndexJump)
        defer { backend.stop() }
        guard case .violation(.usedIndexBeyondInFlight)? = error else {
            Issue.record("got \(String(describing: error))")
            return
        }
        try neighbour.stillWorks()
    }

    @Test func usedIndexGoingBackwardsBreaksDevice() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.usedIndexBackwards, after: 1)
        defer { backend.stop() }
        #expect(error == .violation(.usedIndexWentBackwards(lastSeen: 1, published: 0)))
        try neighbour.stillWorks()
    }

    @Test func usedLengthOverflowFailsRead() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.usedLengthOverflow)
        defer { backend.stop() }
        #expect(error == .violation(.usedLengthTooLarge(id: 0, length: 4097 + 4096, writable: 4097)))
        try neighbour.stillWorks()
    }

    @Test func statusGarbageIsAViolation() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.statusGarbage(0x7f))
        defer { backend.stop() }
        #expect(error == .violation(.blockStatusInvalid(status: 0x7f)))
        try neighbour.stillWorks()
    }

    @Test func statusIOErrorIsAPlainDeviceError() throws {
        let (error, _, disk, backend) = try readAgainst(.statusGarbage(1))
        defer { backend.stop() }
        #expect(error == .deviceError(.ioError))
        #expect(!disk.isBroken)
    }

    @Test func missingStatusWithUsedLenZeroIsAViolation() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.statusMissing)
        defer { backend.stop() }
        #expect(error == .violation(.blockStatusMissing(id: 0)))
        try neighbour.stillWorks()
    }

    @Test func statusNeverWrittenLeavesTheInvalidSentinel() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.statusNotWritten)
        defer { backend.stop() }
        #expect(error == .violation(.blockStatusInvalid(status: 0xff)))
        try neighbour.stillWorks()
    }

    @Test func shortReadWithStatusOkIsAViolation() throws {
        let neighbour = try Neighbour()
        let (error, _, _, backend) = try readAgainst(.shortRead)
        defer { backend.stop() }
        #expect(error == .violation(.blockShortRead(expected: 4096, got: 0)))
        try neighbour.stillWorks()
    }

    @Test func rewritingUsedEntriesAfterPublishIsNeverReread() throws {
        let backend = try MisbehavingBlockBackend(.rewriteUsedAfterPublish)
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        let data = [UInt8](repeating: 0x5c, count: 4096)
        for i in 0..<8 {
            try disk.write(at: UInt64(i) * 4096, bytes: data)
            #expect(try disk.read(at: UInt64(i) * 4096, count: 4096) == data)
        }
        #expect(!disk.isBroken)
    }

    @Test func scribblingOnTheDescriptorTableChangesNothing() throws {
        let backend = try MisbehavingBlockBackend(.scribbleDescriptors)
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        for i in 0..<32 {
            let data = [UInt8](repeating: UInt8(i), count: 1024)
            try disk.write(at: UInt64(i) * 1024, bytes: data)
            #expect(try disk.read(at: UInt64(i) * 1024, count: 1024) == data)
        }
        #expect(!disk.isBroken)
    }

    @Test func closingMidIOFailsInFlightRequestWithDisconnected() throws {
        let neighbour = try Neighbour()
        let (error, seconds, _, backend) = try readAgainst(.closeMidIO)
        defer { backend.stop() }
        guard case .disconnected? = error else {
            Issue.record("expected disconnected, got \(String(describing: error))")
            return
        }
        #expect(seconds < 2)
        try neighbour.stillWorks()
    }

    @Test func unsolicitedControlMessageBreaksDevice() throws {
        let neighbour = try Neighbour()
        let (error, seconds, _, backend) = try readAgainst(.unsolicitedMessage)
        defer { backend.stop() }
        #expect(error == .violation(.controlProtocol("unsolicited message on the vhost-user socket")))
        #expect(seconds < 1)
        try neighbour.stillWorks()
    }

    @Test func neverCompletingDeviceTimesOutAndBreaks() throws {
        let neighbour = try Neighbour()
        let (error, seconds, disk, backend) = try readAgainst(.neverComplete, timeout: 0.3)
        defer { backend.stop() }
        #expect(error == .timeout(milliseconds: 300))
        #expect(error?.rule == .r5)
        #expect(seconds >= 0.29 && seconds < 1.5)
        #expect(disk.isBroken)
        try neighbour.stillWorks()
    }

    @Test func notificationStormIsBackedOffAndTheRequestCompletes() throws {
        let neighbour = try Neighbour()
        let backend = try MisbehavingBlockBackend(.notificationStorm(milliseconds: 300, thenComplete: true))
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        let (error, seconds) = failure { () throws(VirtioError) in _ = try disk.read(at: 0, count: 512) }
        #expect(error == nil)
        #expect(seconds < 2)
        #expect(backend.report.notificationsSent > 100)
        #expect(disk.queue(0).statistics.spuriousNotifications > 0)
        try neighbour.stillWorks()
    }

    @Test func notificationStormWithoutCompletionStillTimesOut() throws {
        let neighbour = try Neighbour()
        let before = threadCPUSeconds()
        let (error, seconds, disk, backend) = try readAgainst(
            .notificationStorm(milliseconds: 1500, thenComplete: false), timeout: 0.4)
        let cpu = threadCPUSeconds() - before
        defer { backend.stop() }
        #expect(error == .timeout(milliseconds: 400))
        #expect(seconds < 1.4)
        // Backed off: the storm must not keep this thread busy for the whole wait (R5).
        #expect(cpu < seconds * 0.7, "driver thread used \(cpu) s of CPU in \(seconds) s")
        #expect(disk.queue(0).statistics.spuriousNotifications > 16)
        try neighbour.stillWorks()
    }

    @Test func memfdTruncationAttemptsAreRefusedBySeals() throws {
        let backend = try MisbehavingBlockBackend(.truncateMemory)
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        #expect(backend.report.truncateShrinkErrno == EPERM)
        #expect(backend.report.truncateGrowErrno == EPERM)
        try disk.write(at: 0, bytes: [UInt8](repeating: 1, count: 512))
        #expect(try disk.read(at: 0, count: 512) == [UInt8](repeating: 1, count: 512))
    }

    // MARK: config

    func connectError(config: BlockConfig, features: UInt64 = MisbehavingBlockBackend.defaultFeatures, queues: Int = 1) throws -> VirtioError? {
        let backend = try MisbehavingBlockBackend(config: config, features: features)
        defer { backend.stop() }
        do {
            let disk = try attach(backend, queues: queues)
            disk.close()
            return nil
        } catch {
            return error
        }
    }

    @Test func capacityOf2To63SectorsIsRefused() throws {
        let neighbour = try Neighbour()
        var c = MisbehavingBlockBackend.defaultConfig()
        c.capacity = 1 << 63
        #expect(try connectError(config: c) == .violation(.blockConfigInvalid(field: "capacity", value: 1 << 63)))
        try neighbour.stillWorks()
    }

    @Test(arguments: [UInt32(0), 3, 256, 1 << 31])
    func nonsenseBlockSizeIsRefused(blockSize: UInt32) throws {
        var c = MisbehavingBlockBackend.defaultConfig()
        c.blockSize = blockSize
        #expect(try connectError(config: c) == .violation(.blockConfigInvalid(field: "blk_size", value: UInt64(blockSize))))
    }

    @Test func numQueues65535IsClampedToGetQueueNum() throws {
        var c = MisbehavingBlockBackend.defaultConfig()
        c.numQueues = 65535
        let backend = try MisbehavingBlockBackend(config: c, queueNum: 2)
        let disk = try attach(backend, queues: 64)
        defer { disk.close(); backend.stop() }
        #expect(disk.info.queueCount == 2)
        #expect(disk.queueCount == 2)
    }

    @Test func segMaxZeroIsClampedToOne() throws {
        var c = MisbehavingBlockBackend.defaultConfig()
        c.segMax = 0
        let backend = try MisbehavingBlockBackend(config: c)
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        #expect(disk.info.segmentsPerRequest == 1)
        try disk.write(at: 0, bytes: [UInt8](repeating: 9, count: 8192))
    }

    @Test func readPastCapacityIsRefusedLocally() throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        let (error, _) = failure { () throws(VirtioError) in _ = try disk.read(at: (1 << 20) - 512, count: 1024) }
        #expect(error == .outOfRange(offset: (1 << 20) - 512, length: 1024, capacity: 1 << 20))
        let (wrap, _) = failure { () throws(VirtioError) in _ = try disk.read(at: UInt64.max - 511, count: 512) }
        guard case .outOfRange? = wrap else { Issue.record("\(String(describing: wrap))"); return }
        #expect(backend.report.requestsServed == 0)
    }

    @Test func readOnlyDeviceRefusesWritesLocally() throws {
        let backend = try MisbehavingBlockBackend(features: MisbehavingBlockBackend.defaultFeatures | BlockProtocol.Feature.readOnly)
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        #expect(failure { () throws(VirtioError) in try disk.write(at: 0, bytes: [UInt8](repeating: 0, count: 512)) }.0 == .readOnly)
        #expect(try disk.read(at: 0, count: 512).count == 512)
    }

    // MARK: control plane

    func controlError(_ m: BlockMisbehaviour) throws -> (VirtioError?, Double) {
        let backend = try MisbehavingBlockBackend(m)
        defer { backend.stop() }
        return failure { () throws(VirtioError) in
            let disk = try attach(backend)
            disk.close()
        }
    }

    @Test func missingVersion1IsRefused() throws {
        #expect(try controlError(.noVersion1).0 == .unsupported("VIRTIO_F_VERSION_1"))
    }

    @Test func shortReplyIsRefused() throws {
        let neighbour = try Neighbour()
        let (error, _) = try controlError(.shortReply(.getFeatures))
        #expect(error == .violation(.controlProtocol(VhostUserError.payloadSize(expected: 8, got: 4).description)))
        try neighbour.stillWorks()
    }

    @Test func oversizedReplyIsRefused() throws {
        let (error, _) = try controlError(.oversizedReply(.getConfig))
        #expect(error == .violation(.controlProtocol(VhostUserError.payloadSize(expected: 72, got: 80).description)))
    }

    @Test func hugeAnnouncedReplySizeIsRefusedBeforeReading() throws {
        let (error, _) = try controlError(.hugeReplySize(.getQueueNum))
        #expect(error == .violation(.controlProtocol(VhostUserError.sizeTooLarge(request: 17, size: 0xff_ffff, limit: 8).description)))
    }

    @Test func mismatchedReplyCodeIsRefused() throws {
        let (error, _) = try controlError(.mismatchedReply(.getProtocolFeatures))
        #expect(error == .violation(.controlProtocol(VhostUserError.unexpectedReply(expected: .getProtocolFeatures, got: 17).description)))
    }

    @Test func descriptorAttachedToReplyIsClosedAndRefused() throws {
        let (error, _) = try controlError(.replyWithDescriptor(.getFeatures))
        #expect(error == .violation(.controlProtocol(VhostUserError.descriptorCount(request: .getFeatures, expected: "0", got: 1).description)))
    }

    @Test func nackIsRefused() throws {
        let (error, _) = try controlError(.nack(.setMemTable))
        #expect(error == .violation(.controlProtocol(VhostUserError.nack(request: .setMemTable, status: 1).description)))
    }

    @Test func ackOfZeroThenCloseIsDetected() throws {
        let (error, seconds) = try controlError(.ackThenClose(.setMemTable))
        guard case .disconnected? = error else { Issue.record("got \(String(describing: error))"); return }
        #expect(seconds < 1)
    }

    @Test func replyNeverSentTimesOut() throws {
        let neighbour = try Neighbour()
        let (error, seconds) = try controlError(.neverReply(.getConfig))
        #expect(error == .timeout(milliseconds: 1000))
        #expect(seconds >= 0.99 && seconds < 2)
        try neighbour.stillWorks()
    }
}

@Suite("virtio-blk driver internals", .serialized)
struct BlockDriverTests {
    @Test func configIsClampedIntoSaneRanges() throws {
        var c = BlockConfig()
        c.capacity = 2048
        c.segMax = 100_000
        c.sizeMax = 100
        c.blockSize = 4096
        c.numQueues = 0
        let all = BlockDevice.wantedFeatures
        let info = try BlockInfo.validate(c, features: all, backendQueues: 8, requestedQueues: 4, queueSize: 128)
        #expect(info.capacityBytes == 1 << 20)
        #expect(info.segmentsPerRequest == 126)
        #expect(info.segmentSizeMax == 512)
        #expect(info.blockSize == 4096)
        #expect(info.queueCount == 1)
        #expect(info.maxTransfer % 4096 == 0)
        // Without BLK_SIZE negotiated the field means nothing: 512.
        c.blockSize = 3
        let plain = try BlockInfo.validate(c, features: 0, backendQueues: 8, requestedQueues: 4, queueSize: 128)
        #expect(plain.blockSize == 512 && plain.segmentsPerRequest == 1 && plain.queueCount == 1)
        #expect(!plain.supportsFlush && !plain.supportsDiscard && plain.maxDiscardBytes == 0)
    }

    @Test func requestsSplitIntoSizeMaxSegmentsUpToSegMax() throws {
        var c = MisbehavingBlockBackend.defaultConfig()
        c.sizeMax = 4096
        c.segMax = 8
        let backend = try MisbehavingBlockBackend(
            config: c, features: MisbehavingBlockBackend.defaultFeatures | BlockProtocol.Feature.sizeMax)
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        #expect(disk.info.maxTransfer == 32768)
        let data = (0..<(256 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 5 &+ ($0 >> 12)) }
        try disk.write(at: 0, bytes: data)
        #expect(try disk.read(at: 0, count: data.count) == data)
        // The hot path refuses what would need more than seg_max segments.
        let q = disk.queue(0)
        let big = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 64)
        defer { big.deallocate() }
        #expect(throws: VirtioError.invalidRequest("65536 bytes exceed the 32768-byte request limit")) {
            try q.submitRead(offset: 0, into: big, tag: 0)
        }
    }

    @Test func completedRequestsLeaveNoDataInSharedMemory() throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer { disk.close(); backend.stop() }
        // A canary that only the driver's private buffers ever hold once requests completed.
        let canary: [UInt8] = [0xc4, 0x7a, 0x21, 0x9e, 0x55, 0x0d, 0xb3, 0x68]
        let data = Array([[UInt8]](repeating: canary, count: 4096 / 8).joined())
        try disk.write(at: 0, bytes: data)
        #expect(try disk.read(at: 0, count: 4096) == data)
        let shared = backend.snapshotSharedMemory()
        #expect(shared.count > 1 << 20)
        var found = false
        var i = 0
        while i + 8 <= shared.count {
            if shared[i] == canary[0] && Array(shared[i..<i + 8]) == canary {
                found = true
                break
            }
            i += 1
        }
        #expect(!found, "freed bounce memory must be zeroed (R7)")
    }

    @Test func invalidTimeoutsAreRefusedWithoutTrapping() throws {
        let backend = try MisbehavingBlockBackend()
        backend.start()
        defer { backend.stop() }
        var options = BlockDevice.Options()
        options.requestTimeout = -1
        #expect(throws: VirtioError.invalidRequest("timeouts must be in (0, 86400] seconds")) {
            _ = try BlockDevice.connect(channel: backend.driverChannel, options: options)
        }
    }
}
