import Dispatch
import Foundation
import SharedMemory
import Testing
import VirtioBlock
import Virtqueue
import Synchronization

func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    return (0..<count).map { _ in
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    }
}

func open(_ qsd: QemuStorageDaemon, queues: Int = 1, reconnect: Bool = false, timeout: Double = 5) throws
    -> VirtioBlockDriver
{
    var options = VirtioBlockDriver.Options()
    options.queues = queues
    options.reconnect = reconnect
    options.requestTimeout = timeout
    return try VirtioBlockDriver.connect(socket: qsd.socket, options: options)
}

@Suite(
    "qemu-storage-daemon (real vhost-user-blk peer)", .serialized,
    .enabled(if: QemuStorageDaemon.installed, "qemu-storage-daemon is not installed (Debian qemu-system-common)"))
struct QemuStorageDaemonTests {
    @Test func infoMatchesTheConfiguredImage() throws {
        let qsd = try QemuStorageDaemon(.file(size: 16 << 20))
        let disk = try open(qsd)
        defer { disk.close() }
        #expect(disk.info.capacityBytes == 16 << 20)
        #expect(disk.info.blockSize == 512)
        #expect(disk.info.supportsFlush && disk.info.supportsDiscard && disk.info.supportsWriteZeroes)
        #expect(!disk.info.readOnly)
        #expect(try disk.identify() == "vhost_user_blk")
    }

    @Test func infoMatchesANullCoExport() throws {
        let qsd = try QemuStorageDaemon(.null(size: 1 << 30))
        let disk = try open(qsd, queues: 4)
        defer { disk.close() }
        #expect(disk.info.capacityBytes == 1 << 30)
        #expect(disk.queueCount == 4)
        #expect(try disk.read(at: 512 << 20, count: 4096) == [UInt8](repeating: 0, count: 4096))
    }

    @Test(arguments: [4 << 10, 64 << 10, 1 << 20, 16 << 20])
    func verifyWritesAndReadsBack(size: Int) throws {
        let qsd = try QemuStorageDaemon(.file(size: 16 << 20))
        let disk = try open(qsd)
        defer { disk.close() }
        let data = pattern(size, seed: UInt64(size))
        try disk.write(at: 0, bytes: data)
        #expect(try disk.read(at: 0, count: size) == data)
    }

    @Test func everyRequestType() async throws {
        let qsd = try QemuStorageDaemon(.file(size: 4 << 20))
        let disk = try open(qsd)
        defer { disk.close() }
        let data = pattern(64 << 10, seed: 7)
        try await disk.write(at: 1 << 20, bytes: data)
        #expect(try await disk.read(at: 1 << 20, count: data.count) == data)
        try await disk.flush()
        #expect(try await disk.identify() == "vhost_user_blk")
        try disk.writeZeroes(at: 1 << 20, length: 32 << 10)
        #expect(try await disk.read(at: 1 << 20, count: 32 << 10) == [UInt8](repeating: 0, count: 32 << 10))
        try disk.discard(at: (1 << 20) + (32 << 10), length: 32 << 10)
        #expect(!disk.isBroken)
    }

    @Test func fourQueuesFromFourThreads() throws {
        let qsd = try QemuStorageDaemon(.file(size: 8 << 20))
        let disk = try open(qsd, queues: 4)
        defer { disk.close() }
        #expect(disk.queueCount == 4)
        let failures = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { qi in
            let q = disk.queue(qi)
            let data = pattern(256 << 10, seed: UInt64(qi + 1))
            let back = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 64)
            defer { back.deallocate() }
            let base = UInt64(qi) * (2 << 20)
            do throws(VirtioError) {
                for (i, chunk) in stride(from: 0, to: data.count, by: 32 << 10).enumerated() {
                    try data[chunk..<chunk + (32 << 10)].withUnsafeBytes { b in
                        Result { () throws(VirtioError) in
                            try q.submitWrite(offset: base + UInt64(chunk), from: b, tag: UInt64(i))
                        }
                    }.get()
                }
                for _ in 0..<8 { if case .failure = q.wait()?.result { failures.add(1, ordering: .relaxed) } }
                try q.submitRead(offset: base, into: back, tag: 99)
                if case .failure = q.wait()?.result { failures.add(1, ordering: .relaxed) }
                if Array(back) != data { failures.add(1, ordering: .relaxed) }
            } catch {
                failures.add(1, ordering: .relaxed)
            }
        }
        #expect(failures.load(ordering: .relaxed) == 0)
    }

    @Test func readPastCapacityIsRefusedLocally() throws {
        let qsd = try QemuStorageDaemon(.file(size: 1 << 20))
        let disk = try open(qsd)
        defer { disk.close() }
        #expect(throws: VirtioError.outOfRange(offset: 1 << 20, length: 512, capacity: 1 << 20)) {
            _ = try disk.read(at: 1 << 20, count: 512)
        }
        #expect(!disk.isBroken)
    }

    @Test func killedMidWriteFailsClearly() throws {
        let qsd = try QemuStorageDaemon(.file(size: 16 << 20))
        let disk = try open(qsd)
        let data = pattern(16 << 20, seed: 3)
        try disk.write(at: 0, bytes: data)  // the daemon is alive and serving
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.05) { qsd.kill() }
        let start = monotonicNanoseconds()
        var error: VirtioError?
        do throws(VirtioError) {
            for _ in 0..<200 { try disk.write(at: 0, bytes: data) }
        } catch let e {
            error = e
        }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        guard case .disconnected? = error else {
            Issue.record("expected disconnected, got \(String(describing: error))")
            return
        }
        #expect(seconds < 10)
        #expect(disk.isBroken)
    }

    @Test func restartAndReconnectKeepsCompletedWritesAndResubmitsInFlight() throws {
        let qsd = try QemuStorageDaemon(.file(size: 8 << 20))
        let disk = try open(qsd, reconnect: true)
        defer { disk.close() }
        let before = pattern(1 << 20, seed: 11)
        try disk.write(at: 0, bytes: before)
        qsd.kill()
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.3) { try? qsd.start() }
        // Submitted while the back-end is dead: stays in the private in-flight list and is
        // resubmitted once the back-end is back.
        let after = pattern(1 << 20, seed: 12)
        try disk.write(at: 2 << 20, bytes: after)
        #expect(try disk.read(at: 0, count: before.count) == before)
        #expect(try disk.read(at: 2 << 20, count: after.count) == after)
        #expect(disk.queue(0).statistics.resubmitted > 0)
        #expect(!disk.isBroken)
    }

    @Test func requestsInFlightWhenKilledAreResubmittedAfterRestart() throws {
        let qsd = try QemuStorageDaemon(.file(size: 16 << 20))
        let disk = try open(qsd, reconnect: true)
        defer { disk.close() }
        let data = pattern(16 << 20, seed: 21)
        // Frozen first, so the write's requests are certainly in flight when it dies (a
        // timer alone raced with a write that finished before the kill).
        qsd.freeze()
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.3) {
            qsd.kill()
            usleep(200_000)
            try? qsd.start()
        }
        try disk.write(at: 0, bytes: data)
        #expect(disk.queue(0).statistics.resubmitted > 0, "the kill should land mid-write")
        #expect(try disk.read(at: 0, count: data.count) == data)
        #expect(!disk.isBroken)
    }

    @Test func readOnlyExportRefusesWritesCleanly() throws {
        let qsd = try QemuStorageDaemon(.file(size: 1 << 20), writable: false)
        let disk = try open(qsd)
        defer { disk.close() }
        #expect(disk.info.readOnly)
        #expect(throws: VirtioError.readOnly) { try disk.write(at: 0, bytes: [UInt8](repeating: 1, count: 512)) }
        #expect(try disk.read(at: 0, count: 512).count == 512)
        #expect(!disk.isBroken)
    }
}
