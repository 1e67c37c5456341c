#if canImport(Glibc)
import Glibc
#endif
import CRingFence
import RingTestSupport
import SharedMemory
import Synchronization
import Testing
@testable import XenRing

/// Issue 13 against serve-xen-blk's backend: descriptors of the wrong kind are refused at
/// the handshake (a pipe would SIGPIPE the server, a memfd would spin it), and an event fd
/// that a frontend keeps readable without posting work is backed off and idled out.
@Suite(.serialized) struct XenSharedDescriptorTests {
    /// Sends a handshake with the given event descriptors and returns why the backend
    /// refused it.
    static func refusal(incoming: Int32, outgoing: Int32) throws -> [XenConnectError] {
        let (a, b) = try UnixChannel.pair()
        let backend = BackendThread(channels: [b])
        let deadline = Deadline.after(seconds: 5)
        _ = try a.receiveNode(maxDescriptors: 0, until: deadline)
        let table = try SharedRegion(name: "t", size: 512 * GrantLayout.entrySize)
        let frames = try SharedRegion(name: "f", size: SharedRingLayout.pageSize)
        try a.sendNode(
            XenStoreNode([
                "state": "3", "ring-ref": "8", "protocol": "x86_64-abi", "grant-entries": "512", "grant-frames": "1",
            ]), descriptors: [table.fileDescriptor, frames.fileDescriptor, incoming, outgoing], until: deadline)
        backend.join()
        return backend.refusals
    }

    /// Pre-fix: one request made the server write to the pipe and die of SIGPIPE (141).
    @Test func pipeAsEventChannelIsRefusedAtTheHandshake() throws {
        var p: [Int32] = [-1, -1]
        #expect(pipe(&p) == 0)
        close(p[0])  // the reader is gone: a write would raise SIGPIPE
        defer { close(p[1]) }
        let incoming = try Notifier()
        let refusals = try Self.refusal(incoming: incoming.fileDescriptor, outgoing: p[1])
        #expect(refusals == [.setup("descriptor is a pipe, not a eventfd")])
    }

    /// Pre-fix: an always-readable memfd as the event fd spun the server at ~93 % of a CPU.
    @Test func memfdAsEventChannelIsRefusedAtTheHandshake() throws {
        let memfd = rf_memfd_create("always-readable", RF_MFD_CLOEXEC)
        defer { close(memfd) }
        let outgoing = try Notifier()
        let refusals = try Self.refusal(incoming: memfd, outgoing: outgoing.fileDescriptor)
        #expect(refusals == [.setup("descriptor is a memfd, not a eventfd")])
    }

    /// A frontend that keeps the backend's event fd readable without posting a request:
    /// the backend backs the storm off (shared `WakeBackoff`) and still drops the connection
    /// as idle on time. Pre-fix the idle timer restarted at every event: never idle.
    @Test func eventStormWithoutWorkIsBackedOffAndIdledOut() throws {
        let (a, b) = try UnixChannel.pair()
        let storage = UnsafeSendable(MemoryStorage(sectors: 2048))
        let result = Mutex<(XenBlkBackendConnection.End?, UInt64, UInt64)>((nil, 0, 0))
        let server = TestThread {
            guard let c = try? XenBlkBackendConnection.accept(channel: b, storage: storage.value) else { return }
            let end = c.run(idleTimeout: 1)
            result.withLock { $0 = (end, c.events.spuriousEvents, c.events.longestBackoffNanoseconds) }
        }
        let device = try XenBlkFrontendDevice.connect(channel: a)
        let stop = Atomic<Bool>(false)
        let events = device.events  // the frontend's channel: ours to signal from a thread
        let storm = TestThread {
            while !stop.load(ordering: .relaxed) {
                events.outgoing.signal()
                usleep(20)
            }
        }
        let start = monotonicNanoseconds()
        let deadline = Deadline.after(seconds: 10)
        while result.withLock({ $0.0 }) == nil && !deadline.hasPassed { usleep(10_000) }
        let elapsed = monotonicNanoseconds() - start
        stop.store(true, ordering: .relaxed)
        storm.join()
        server.join()
        let (end, spurious, longest) = result.withLock { $0 }
        #expect(end == .idle)
        #expect(elapsed < 3_000_000_000, "idled out after \(elapsed / 1_000_000) ms of storm")
        #expect(spurious > WakeBackoff.threshold)
        #expect(longest > 0, "the storm was backed off")
        withExtendedLifetime(device) {}
    }

    /// The frontend clears O_NONBLOCK on the backend's outgoing event fd and fills its
    /// counter, then posts a request: the backend's notify would block forever; the
    /// watchdog frees it and the connection is dropped with `notifierBlocked` (R6).
    @Test func eventFDMadeBlockingAndSaturatedDropsTheConnection() throws {
        let (device, backend) = try connectedPair()
        let fd = device.events.incoming.fileDescriptor  // what the backend signals
        #expect(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) == 0)
        var full: UInt64 = 0xFFFF_FFFF_FFFF_FFFE
        #expect(write(fd, &full, 8) == 8)
        // Post and kick, but never wait: a wait would drain the counter and free the write.
        try device.front.submitFlush(token: 1)
        device.kick()
        backend.join()
        #expect(backend.ends == [.dropped(.notifierBlocked(role: "event channel"))])
        withExtendedLifetime(device) {}
    }
}
