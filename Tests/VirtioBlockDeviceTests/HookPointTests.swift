import BlockImage
import Foundation
import SharedMemory
import Synchronization
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// The seams the Adversary (issue 5) will use: a device that wraps the real one can act
/// after completion / before publish, on a timer, on config reads, and on control replies,
/// without touching the transport.
@Suite(.serialized) struct HookPointTests {
    final class Counters: Sendable {
        let idle = Atomic<Int>(0)
        let published = Atomic<Int>(0)
    }

    /// Wraps the real handler; completes every chain a second time before publishing.
    final class DuplicatingHandler: QueueHandler {
        let inner: any QueueHandler
        let counters: Counters
        var lastHead: UInt16?
        init(_ inner: any QueueHandler, _ counters: Counters) {
            self.inner = inner
            self.counters = counters
        }
        func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
            try inner.serve(queue, memory: memory, budget: budget)
        }
        func beforePublish(_ queue: any DeviceRing, memory: GuestMemory) {
            counters.published.add(1, ordering: .relaxed)
            queue.complete(head: 0, length: 0xdead)
        }
        func idle(_ queue: any DeviceRing, memory: GuestMemory) {
            counters.idle.add(1, ordering: .relaxed)
        }
    }

    final class WrappingDevice: VhostUserDevice {
        let inner: VirtioBlockDevice
        let counters = Counters()
        init(_ inner: VirtioBlockDevice) { self.inner = inner }
        var features: UInt64 { inner.features }
        var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
        var queueCount: Int { inner.queueCount }
        func readConfig(offset: UInt32, size: Int) -> [UInt8]? {
            var c = inner.config
            c.capacity = 1 << 63  // hostile config
            return Array(c.encoded.prefix(size))
        }
        func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }
        func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
            DuplicatingHandler(inner.makeQueueHandler(queue: queue, features: features), counters)
        }
        func frontendDisconnected() { inner.frontendDisconnected() }
    }

    final class FeatureLie: ControlReplyHook {
        func willSend(_ reply: Message, answering request: Request) -> Message? {
            guard request == .getFeatures else { return reply }
            return Message(.getFeatures, flags: reply.header.flags, payload: U64Payload(.max).encoded)
        }
    }

    @Test func wrappedDeviceCanTamperAtEveryHookPoint() throws {
        let dir = NSTemporaryDirectory() + "rf-hook-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: dir + "/d.img"))
        let real = VirtioBlockDevice(image: try DeviceImage(path: dir + "/d.img"), options: VirtioBlockDeviceOptions())
        let device = WrappingDevice(real)
        var configuration = Backend.Configuration()
        configuration.pollInterval = 0.05
        configuration.queueTiming.idleTick = 0.1
        let backend = Backend(device: device, configuration: configuration, replyHook: FeatureLie())
        let listener = try UnixListener(path: dir + "/s.sock")
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try? backend.run(listener: listener)
            done.signal()
        }
        defer {
            backend.stop()
            done.wait()
        }
        let f = try TestFrontend(path: dir + "/s.sock")
        #expect(try U64Payload.decode(try f.query(.getFeatures)).value == .max, "control reply hook")
        let config = BlockConfig.decode(
            try ConfigSpace.decode(
                try f.query(.getConfig, ConfigSpace(payload: [UInt8](repeating: 0, count: 60)).encoded)
            ).payload)
        #expect(config.capacity == 1 << 63, "config hook")
        // Negotiate honestly (only what the real device offers; split ring) and set the ring up.
        try f.send(
            .setFeatures, U64Payload(real.features & ~FeatureBits.ringPacked | FeatureBits.protocolFeatures).encoded)
        try f.send(.setProtocolFeatures, U64Payload(ProtocolFeatures([.replyAck, .config]).rawValue).encoded)
        #expect(
            try f.acked(
                .setMemTable,
                TestFrontend.memoryTable([
                    (TestFrontend.guestBase, UInt64(TestFrontend.regionSize), TestFrontend.userBase, 0)
                ]), fds: [f.region.fileDescriptor]) == 0)
        try f.setUpQueue(0, size: 8)
        let r = try f.blockRequest(type: .flush, sector: 0)
        #expect(r.status == 0 && r.usedLength == 1)
        #expect(f.waitUsed()?.length == 0xdead, "before-publish hook completed twice")
        usleep(400_000)
        #expect(device.counters.idle.load(ordering: .relaxed) >= 1, "timer hook")
        #expect(device.counters.published.load(ordering: .relaxed) >= 1)
    }
}
