import BlockImage
import Foundation
import RingTestSupport
import SharedMemory
import Synchronization
import Testing
import VhostUser
import VirtioBlock

/// A serve-blk back-end on a fixed socket path and image that can be stopped and started
/// again, the way a restarted daemon comes back for a reconnecting driver.
final class RestartableBackend: @unchecked Sendable {
    let directory: String
    let imagePath: String
    let socketPath: String
    let queues: Int
    private var backend: Backend?
    private var thread: TestThread?

    init(queues: Int, imageSize: Int) throws {
        directory = NSTemporaryDirectory() + "rf-reconnect-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        imagePath = directory + "/disk.img"
        socketPath = directory + "/s.sock"
        self.queues = queues
        try Data(count: imageSize).write(to: URL(fileURLWithPath: imagePath))
        try start()
    }

    /// A fresh back-end (new image handle, new sessions) listening when this returns.
    func start() throws {
        var options = VirtioBlockDeviceOptions()
        options.queueCount = queues
        var configuration = Backend.Configuration()
        configuration.messageDeadline = 2
        configuration.firstMessageDeadline = 5
        configuration.pollInterval = 0.02
        configuration.queueTiming.idleTick = 0.2
        let backend = Backend(
            device: VirtioBlockDevice(image: try DeviceImage(path: imagePath), options: options),
            configuration: configuration)
        let listening = DispatchSemaphore(value: 0)
        let path = socketPath
        // The listener lives inside the thread: it is gone (and its path unlinked) when the
        // thread ends, so the next listener's path is never unlinked behind its back.
        thread = TestThread {
            do {
                let listener = try UnixListener(path: path)
                listening.signal()
                try backend.run(listener: listener)
            } catch {
                listening.signal()
            }
        }
        self.backend = backend
        listening.wait()
    }

    /// Closes the connection (the driver sees the socket close) and stops listening.
    func stop() {
        backend?.stop()
        thread?.join()
        backend = nil
        thread = nil
    }

    func remove() {
        stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Counters the queue threads share with the test thread.
final class ReconnectProgress: Sendable {
    let stop = Atomic<Bool>(false)
    let completions = Atomic<Int>(0)
    let issues = Mutex<[String]>([])
    /// Per queue: block -> version of the last write whose completion said OK.
    let written = Mutex<[[Int: UInt64]]>([])

    func record(_ issue: String) { issues.withLock { $0.append(issue) } }
}

/// `ringfence blk --reconnect --queues N bench`'s shape: one thread per queue, each with
/// writes and reads in flight, while the back-end closes and restarts on the same path.
/// Afterwards every write that completed reads back with its content, every request
/// completed exactly once, and the device is healthy. CI runs it under ThreadSanitizer
/// (`--filter ThreadedReconnect`).
@Suite(.serialized) struct ThreadedReconnectTests {
    static let blockSize = 4096
    static let blocksPerQueue = 32
    static let depth = 4

    /// The content of `block` of `queue` after its write number `version`.
    static func fill(_ buffer: UnsafeMutableRawBufferPointer, queue: Int, block: Int, version: UInt64) {
        let words = buffer.bindMemory(to: UInt64.self)
        var z = UInt64(queue) << 48 | UInt64(block) << 32 | version
        for i in words.indices {
            z = z &+ 0x9e37_79b9_7f4a_7c15
            var x = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            x = (x ^ (x >> 27)) &* 0x94d0_49bb_1331_11eb
            words[i] = x ^ (x >> 31)
        }
    }

    static func expected(queue: Int, block: Int, version: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blockSize)
        bytes.withUnsafeMutableBytes { fill($0, queue: queue, block: block, version: version) }
        return bytes
    }

    static func offset(queue: Int, block: Int) -> UInt64 {
        UInt64((queue * blocksPerQueue + block) * blockSize)
    }

    /// One queue's thread: rounds of `depth` writes to fresh versions of some blocks and
    /// `depth` reads of blocks whose writes already completed, all in flight together.
    static func drive(_ disk: VirtioBlockDriver, queue index: Int, progress: ReconnectProgress) {
        let q = disk.queue(index)
        let writeBuffers = (0..<depth).map { _ in
            UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
        }
        let readBuffers = (0..<depth).map { _ in
            UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
        }
        defer { for b in writeBuffers + readBuffers { b.deallocate() } }
        var written: [Int: UInt64] = [:]
        /// tag -> (is a write, buffer, block, version): a tag seen twice or never is a bug.
        var outstanding: [UInt64: (write: Bool, buffer: Int, block: Int, version: UInt64)] = [:]
        var nextTag: UInt64 = 1
        var round = 0
        func issue(_ text: String) { progress.record("queue \(index), round \(round): \(text)") }
        rounds: while !progress.stop.load(ordering: .relaxed) {
            let version = UInt64(round + 1)
            for k in 0..<depth {
                let block = (round * depth + k) % blocksPerQueue
                fill(writeBuffers[k], queue: index, block: block, version: version)
                let tag = nextTag
                nextTag += 1
                outstanding[tag] = (true, k, block, version)
                do throws(VirtioError) {
                    try q.submitWrite(
                        offset: offset(queue: index, block: block), from: UnsafeRawBufferPointer(writeBuffers[k]),
                        tag: tag)
                } catch {
                    issue("write submit failed: \(error)")
                    break rounds
                }
            }
            // Reads of the previous round's blocks: their writes completed, so their
            // content is known whatever happens to the connection now.
            let previous = round == 0 ? [] : (0..<depth).map { ((round - 1) * depth + $0) % blocksPerQueue }
            for (k, block) in previous.enumerated() where written[block] != nil {
                let tag = nextTag
                nextTag += 1
                outstanding[tag] = (false, k, block, written[block] ?? 0)
                do throws(VirtioError) {
                    try q.submitRead(offset: offset(queue: index, block: block), into: readBuffers[k], tag: tag)
                } catch {
                    issue("read submit failed: \(error)")
                    break rounds
                }
            }
            while !outstanding.isEmpty {
                guard let c = q.wait(until: .after(seconds: 30)) else {
                    issue("\(outstanding.count) requests never completed")
                    break rounds
                }
                guard let request = outstanding.removeValue(forKey: c.tag) else {
                    issue("tag \(c.tag) completed twice (or was never submitted)")
                    continue
                }
                guard case .success = c.result else {
                    issue("tag \(c.tag) failed: \(c.result)")
                    continue
                }
                if request.write {
                    written[request.block] = request.version
                } else if Array(readBuffers[request.buffer])
                    != expected(queue: index, block: request.block, version: request.version)
                {
                    issue("block \(request.block) does not hold version \(request.version)")
                }
                progress.completions.add(1, ordering: .relaxed)
            }
            round += 1
        }
        if q.inFlight != 0 { issue("\(q.inFlight) requests still in flight at the end") }
        progress.written.withLock { $0[index] = written }
    }

    /// Waits until the threads completed `count` requests in all (false after 60 s).
    static func awaitCompletions(_ progress: ReconnectProgress, _ count: Int) -> Bool {
        let deadline = Deadline.after(seconds: 60)
        while progress.completions.load(ordering: .relaxed) < count {
            if deadline.hasPassed || !progress.issues.withLock({ $0.isEmpty }) { return false }
            usleep(2000)
        }
        return true
    }

    @Test(arguments: [(2, true), (3, false)])
    func threadedReconnectKeepsCompletedWritesAndCompletesEachRequestOnce(queues: Int, packed: Bool) throws {
        let server = try RestartableBackend(queues: queues, imageSize: queues * Self.blocksPerQueue * Self.blockSize)
        defer { server.remove() }
        var options = VirtioBlockDriver.Options()
        options.queues = queues
        options.queueSize = 32  // 2 x depth requests of 3 descriptors
        options.reconnect = true
        options.packedRing = packed
        options.requestTimeout = 20
        options.reconnectTimeout = 20
        options.controlTimeout = 5
        let disk = try VirtioBlockDriver.connect(socket: server.socketPath, options: options)
        defer { disk.close() }
        #expect(disk.queueCount == queues)
        #expect(disk.ringFormat == (packed ? .packed : .split))

        let progress = ReconnectProgress()
        progress.written.withLock { $0 = Array(repeating: [:], count: queues) }
        let threads = (0..<queues).map { index in
            TestThread { Self.drive(disk, queue: index, progress: progress) }
        }
        // Three restarts, each after the threads made progress on the previous connection;
        // the back-end stays away for a while so requests are submitted while it is gone.
        var target = 0
        for restart in 0..<3 {
            target += 60 * queues
            guard Self.awaitCompletions(progress, target) else {
                Issue.record("no progress before restart \(restart)")
                break
            }
            server.stop()
            usleep(UInt32(50_000 + 50_000 * restart))
            try server.start()
        }
        target += 60 * queues
        #expect(Self.awaitCompletions(progress, target), "no progress after the last restart")
        progress.stop.store(true, ordering: .relaxed)
        for t in threads { t.join() }

        for issue in progress.issues.withLock({ $0 }) { Issue.record(Comment(rawValue: issue)) }
        #expect(!disk.isBroken, "\(String(describing: disk.failure))")
        let resubmitted = (0..<queues).reduce(UInt64(0)) { $0 + disk.queue($1).statistics.resubmitted }
        #expect(resubmitted > 0, "the restarts should land with requests in flight")
        // Every completed write, read back through the driver and straight from the image.
        let image = try Data(contentsOf: URL(fileURLWithPath: server.imagePath))
        let written = progress.written.withLock { $0 }
        for (queue, blocks) in written.enumerated() {
            #expect(!blocks.isEmpty)
            for (block, version) in blocks {
                let at = Self.offset(queue: queue, block: block)
                let want = Self.expected(queue: queue, block: block, version: version)
                #expect(try disk.read(at: at, count: Self.blockSize) == want, "queue \(queue) block \(block)")
                #expect(
                    Array(image[Int(at)..<Int(at) + Self.blockSize]) == want, "image: queue \(queue) block \(block)")
            }
        }
    }

    /// The back-end never comes back: one thread gives up at the reconnect deadline, the
    /// parked ones do not wait past it, and every request fails exactly once.
    @Test func threadedReconnectThatNeverSucceedsFailsEveryRequestOnceInTime() throws {
        let queues = 3
        let server = try RestartableBackend(queues: queues, imageSize: queues * Self.blocksPerQueue * Self.blockSize)
        defer { server.remove() }
        var options = VirtioBlockDriver.Options()
        options.queues = queues
        options.queueSize = 32
        options.reconnect = true
        options.requestTimeout = 20
        options.reconnectTimeout = 0.5
        options.controlTimeout = 1
        let disk = try VirtioBlockDriver.connect(socket: server.socketPath, options: options)
        defer { disk.close() }
        let progress = ReconnectProgress()
        let threads = (0..<queues).map { index in
            TestThread {
                let q = disk.queue(index)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.blockSize, alignment: 4096)
                defer { buffer.deallocate() }
                Self.fill(buffer, queue: index, block: 0, version: 1)
                var outstanding = Set<UInt64>()
                var nextTag: UInt64 = 1
                var failed = false
                var announced = false
                // Keeps `depth` writes in flight until the device fails, then drains.
                while true {
                    while !failed && outstanding.count < Self.depth {
                        do throws(VirtioError) {
                            try q.submitWrite(
                                offset: Self.offset(queue: index, block: Int(nextTag % UInt64(Self.blocksPerQueue))),
                                from: UnsafeRawBufferPointer(buffer), tag: nextTag)
                            outstanding.insert(nextTag)
                            nextTag += 1
                        } catch {
                            failed = true
                        }
                    }
                    if !announced {
                        announced = true
                        progress.completions.add(1, ordering: .relaxed)  // counts threads under way here
                    }
                    if outstanding.isEmpty { break }
                    guard let c = q.wait(until: .after(seconds: 20)) else { break }
                    if outstanding.remove(c.tag) == nil { progress.record("queue \(index): tag \(c.tag) twice") }
                    if case .failure = c.result { failed = true }
                }
                if !outstanding.isEmpty { progress.record("queue \(index): \(outstanding.count) never returned") }
                if q.inFlight != 0 { progress.record("queue \(index): \(q.inFlight) still in flight") }
            }
        }
        while progress.completions.load(ordering: .relaxed) < queues { usleep(1000) }
        let start = Deadline.now
        server.stop()
        for t in threads { t.join() }
        let seconds = Double(Deadline.now.uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        for issue in progress.issues.withLock({ $0 }) { Issue.record(Comment(rawValue: issue)) }
        #expect(disk.isBroken)
        // The reconnect deadline, one last attempt's replies, and the back-end's stop.
        #expect(seconds < 5, "took \(seconds) s")
    }
}
