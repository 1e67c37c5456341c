import Foundation
import RingTestSupport
import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// A healthy in-process back-end and device, kept open across each attack: the blast
/// radius of a misbehaving device must be that device only (R6).
final class Neighbour {
    let backend: MisbehavingBlockBackend
    let disk: VirtioBlockDriver

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

func attach(
    _ backend: MisbehavingBlockBackend, timeout: Double = 2, queues: Int = 1, wait: WaitStrategy? = nil
) throws(VirtioError) -> VirtioBlockDriver {
    backend.start()
    var options = VirtioBlockDriver.Options()
    options.requestTimeout = timeout
    options.controlTimeout = 1
    options.queues = queues
    if let wait { options.wait = wait }
    return try VirtioBlockDriver.connect(channel: backend.driverChannel, options: options)
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
func readAgainst(_ m: BlockMisbehaviour, after: Int = 0, timeout: Double = 2) throws -> (
    VirtioError?, Double, VirtioBlockDriver, MisbehavingBlockBackend
) {
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
        defer {
            disk.close()
            backend.stop()
        }
        let data = (0..<65536).map { UInt8(truncatingIfNeeded: $0 ^ ($0 >> 8)) }
        try await disk.write(at: 4096, bytes: data)
        #expect(try await disk.read(at: 4096, count: data.count) == data)
        try await disk.flush()
        try disk.discard(at: 0, length: 4096)
        try disk.writeZeroes(at: 0, length: 4096)
        #expect(try await disk.identify() == "misbehaving-blk")
        #expect(disk.info.capacityBytes == 1 << 20)
    }

    @Test func unsolicitedControlMessageBreaksDevice() throws {
        let neighbour = try Neighbour()
        let (error, seconds, _, backend) = try readAgainst(.unsolicitedMessage)
        defer { backend.stop() }
        #expect(error == .deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket")))
        #expect(seconds < 1)
        try neighbour.stillWorks()
    }

    // MARK: config

    func connectError(config: BlockConfig, features: UInt64 = MisbehavingBlockBackend.defaultFeatures, queues: Int = 1)
        throws -> VirtioError?
    {
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

    @Test(arguments: [UInt32(0), 3, 256, 1 << 31])
    func nonsenseBlockSizeIsRefused(blockSize: UInt32) throws {
        var c = MisbehavingBlockBackend.defaultConfig()
        c.blockSize = blockSize
        #expect(
            try connectError(config: c)
                == .deviceViolation(.blockConfigInvalid(field: "blk_size", value: UInt64(blockSize))))
    }

    @Test func numQueues65535IsClampedToGetQueueNum() throws {
        var c = MisbehavingBlockBackend.defaultConfig()
        c.numQueues = 65535
        let backend = try MisbehavingBlockBackend(config: c, queueNum: 2)
        let disk = try attach(backend, queues: 64)
        defer {
            disk.close()
            backend.stop()
        }
        #expect(disk.info.queueCount == 2)
        #expect(disk.queueCount == 2)
    }

    @Test func readPastCapacityIsRefusedLocally() throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer {
            disk.close()
            backend.stop()
        }
        let (error, _) = failure { () throws(VirtioError) in _ = try disk.read(at: (1 << 20) - 512, count: 1024) }
        #expect(error == .outOfRange(offset: (1 << 20) - 512, length: 1024, capacity: 1 << 20))
        let (wrap, _) = failure { () throws(VirtioError) in _ = try disk.read(at: UInt64.max - 511, count: 512) }
        guard case .outOfRange? = wrap else {
            Issue.record("\(String(describing: wrap))")
            return
        }
        #expect(backend.report.requestsServed == 0)
    }

    @Test func readOnlyDeviceRefusesWritesLocally() throws {
        let backend = try MisbehavingBlockBackend(
            features: MisbehavingBlockBackend.defaultFeatures | BlockProtocol.Feature.readOnly)
        let disk = try attach(backend)
        defer {
            disk.close()
            backend.stop()
        }
        #expect(
            failure { () throws(VirtioError) in try disk.write(at: 0, bytes: [UInt8](repeating: 0, count: 512)) }.0
                == .readOnly)
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

    @Test func ackOfZeroThenCloseIsDetected() throws {
        let (error, seconds) = try controlError(.ackThenClose(.setMemTable))
        guard case .disconnected? = error else {
            Issue.record("got \(String(describing: error))")
            return
        }
        #expect(seconds < 1)
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
        let all = VirtioBlockDriver.wantedFeatures
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
        defer {
            disk.close()
            backend.stop()
        }
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

    /// R7: private bytes the driver copied into the bounce pool for a write are zeroed when
    /// the write completes, and a read's private destination never enters shared memory.
    /// (The bytes a device writes for a read stay in the slice parked for reuse: the
    /// only other party mapping the pool is that device, which wrote them.)
    @Test func completedRequestsLeaveNoPrivateDataInSharedMemory() throws {
        let backend = try MisbehavingBlockBackend()
        let disk = try attach(backend)
        defer {
            disk.close()
            backend.stop()
        }
        func sharedMemoryHolds(_ canary: [UInt8]) -> Bool {
            let shared = backend.snapshotSharedMemory()
            #expect(shared.count > 1 << 20)
            var i = 0
            while i + canary.count <= shared.count {
                if shared[i] == canary[0] && Array(shared[i..<i + canary.count]) == canary { return true }
                i += 1
            }
            return false
        }
        let canary: [UInt8] = [0xc4, 0x7a, 0x21, 0x9e, 0x55, 0x0d, 0xb3, 0x68]
        let data = Array([[UInt8]](repeating: canary, count: 4096 / 8).joined())
        try disk.write(at: 0, bytes: data)
        #expect(!sharedMemoryHolds(canary), "a completed write's data must be zeroed in the bounce pool (R7)")
        // Reads go into a private buffer that holds another canary beforehand.
        let readCanary: [UInt8] = [0x3e, 0x91, 0x0b, 0xd7, 0x62, 0xa8, 0x14, 0xf5]
        var buffer = Array([[UInt8]](repeating: readCanary, count: 4096 / 8).joined())
        let q = disk.queue(0)
        try buffer.withUnsafeMutableBytes { b in
            try q.submitRead(offset: 4096, into: b, tag: 7)
            let c = q.wait(until: .after(seconds: 5))
            #expect(c?.tag == 7)
            #expect(throws: Never.self) { try c?.result.get() }
        }
        #expect(!sharedMemoryHolds(readCanary), "a read's private destination must never be shared (R7)")
        // And the slice parked by the write, reused by later requests, carries none of it.
        try disk.write(at: 8192, bytes: [UInt8](repeating: 0x11, count: 4096))
        #expect(!sharedMemoryHolds(canary))
    }

    @Test func invalidTimeoutsAreRefusedWithoutTrapping() throws {
        let backend = try MisbehavingBlockBackend()
        backend.start()
        defer { backend.stop() }
        var options = VirtioBlockDriver.Options()
        options.requestTimeout = -1
        #expect(throws: VirtioError.invalidRequest("timeouts must be in (0, 86400] seconds")) {
            _ = try VirtioBlockDriver.connect(channel: backend.driverChannel, options: options)
        }
    }
}
