import Foundation
import SharedMemory
import Testing
import VirtioBlock

@testable import VerifiedBlock

let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent()
let ringfenceBinary = packageRoot.appendingPathComponent(".build/debug/ringfence").path
var ringfenceBinaryBuilt: Bool { FileManager.default.isExecutableFile(atPath: ringfenceBinary) }

/// `ringfence serve-blk` on `image`, as a child process we can SIGKILL.
final class ServeBlk {
    let process: ChildProcess
    let socket: String

    init(image: String, socket: String) throws {
        try? FileManager.default.removeItem(atPath: socket)
        process = try ChildProcess(
            executable: ringfenceBinary,
            arguments: ["serve-blk", "--socket", socket, "--image", image, "--log-level", "error"])
        self.socket = socket
        let end = Deadline.after(seconds: 10)
        while !FileManager.default.fileExists(atPath: socket) {
            if end.hasPassed { throw VerifiedBlockError.local("serve-blk did not start") }
            usleep(5000)
        }
    }

    func connect() throws -> VirtioBlockDriver {
        var options = VirtioBlockDriver.Options()
        options.requestTimeout = 3
        options.controlTimeout = 3
        // The socket file appears just before the back-end listens: retry briefly.
        let end = Deadline.after(seconds: 5)
        while true {
            do {
                return try VirtioBlockDriver.connect(socket: socket, options: options)
            } catch {
                if end.hasPassed { throw error }
                usleep(10_000)
            }
        }
    }

    func stop() {
        _ = kill(process.pid, SIGTERM)
        if process.wait(until: .after(seconds: 3)) == nil { process.kill() }
    }
}

/// A block's content in generation `gen` (generation 0: never written, zeros).
func content(block: UInt64, gen: Int) -> [UInt8] {
    if gen == 0 { return [UInt8](repeating: 0, count: 4096) }
    return (0..<4096).map { UInt8(truncatingIfNeeded: $0 &+ Int(block) &* 37 &+ gen &* 101) }
}

@Suite(
    "VerifiedBlock over a real serve-blk", .serialized,
    .enabled(if: ringfenceBinaryBuilt, "the ringfence executable is not built"))
struct ServeBlkCrashTests {
    /// The back-end is SIGKILLed at a random point of a write loop, three times; after each
    /// restart every block reads as its old or its new content, and the writes go on.
    @Test func killedBackEndLeavesEveryBlockOldOrNew() throws {
        let dir = NSTemporaryDirectory() + "vb-crash-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = dir + "/disk.img"
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        #expect(truncate(image, 4 << 20) == 0)
        let key = (0..<32).map { UInt8($0) }
        let anchor = dir + "/anchor"
        let n: UInt64 = 48
        var durable = [Int](repeating: 0, count: Int(n))
        var latest = durable
        var server = try ServeBlk(image: image, socket: dir + "/blk.sock")
        var driver = try server.connect()
        var device = try VerifiedBlockDevice.format(transport: driver, key: key, anchorPath: anchor)
        var gen = 0
        var outcomes = (old: 0, new: 0)
        for round in 0..<3 {
            let pid = server.process.pid
            let delay = UInt32.random(in: 20_000...120_000)
            let killer = Thread {
                usleep(delay)
                _ = kill(pid, SIGKILL)
            }
            killer.start()
            writing: while true {
                gen += 1
                var b: UInt64 = 0
                while b < n {
                    let list = (b..<min(n, b + 3)).map { $0 }
                    for x in list { latest[Int(x)] = gen }
                    let data = list.flatMap { content(block: $0, gen: gen) }
                    do { try device.write(block: b, bytes: data) } catch { break writing }
                    b += 3
                }
                do { try device.flush() } catch { break writing }
                durable = latest
            }
            #expect(device.isBroken, "round \(round): the killed back-end is a transport failure")
            guard case .transport = device.failure else {
                Issue.record("round \(round): expected a transport failure, got \(String(describing: device.failure))")
                return
            }
            _ = server.process.wait(until: .after(seconds: 5))
            driver.close()
            server = try ServeBlk(image: image, socket: dir + "/blk.sock")
            driver = try server.connect()
            device = try VerifiedBlockDevice.open(transport: driver, key: key, anchorPath: anchor)
            for blockIndex in 0..<n {
                let got = try device.read(block: blockIndex, count: 1)
                let i = Int(blockIndex)
                if got == content(block: blockIndex, gen: latest[i]) {
                    if latest[i] != durable[i] { outcomes.new += 1 }
                    durable[i] = latest[i]
                } else if got == content(block: blockIndex, gen: durable[i]) {
                    if latest[i] != durable[i] { outcomes.old += 1 }
                    latest[i] = durable[i]
                } else {
                    Issue.record(
                        "round \(round): block \(blockIndex) is neither generation \(durable[i]) nor \(latest[i])")
                }
            }
        }
        // Still writable after the last recovery.
        try device.write(block: 0, bytes: content(block: 0, gen: 999))
        try device.flush()
        #expect(try device.read(block: 0, count: 1) == content(block: 0, gen: 999))
        driver.close()
        server.stop()
        print(
            "crash test: \(gen) generations, in-flight blocks recovered as new \(outcomes.new), as old \(outcomes.old)")
    }

    /// The other side: the client (`ringfence blk --key --anchor verify`, writing a seeded
    /// pattern over 12 MiB) is SIGKILLed at a random moment, three times; each time a fresh
    /// client opens the device (recovering what was in flight) and every block holds the
    /// previous round's pattern or this round's.
    @Test func killedClientLeavesEveryBlockOldOrNew() throws {
        let dir = NSTemporaryDirectory() + "vb-client-crash-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = dir + "/disk.img"
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        #expect(truncate(image, 32 << 20) == 0)
        let server = try ServeBlk(image: image, socket: dir + "/blk.sock")
        defer { server.stop() }
        let v = ["blk", "--socket", server.socket, "--key", dir + "/key", "--anchor", dir + "/anchor"]
        let format = try ChildProcess(
            executable: ringfenceBinary, arguments: v + ["format"], stdout: open("/dev/null", O_WRONLY))
        #expect(format.wait(until: .after(seconds: 30)) == .exited(0))
        let blocks = 3072
        // One whole run first: its pattern is the first "old", its duration sets when to kill.
        let start = monotonicNanoseconds()
        let full = try ChildProcess(
            executable: ringfenceBinary, arguments: v + ["verify", "--size", "12M", "--seed", "1"],
            stdout: open("/dev/null", O_WRONLY))
        #expect(full.wait(until: .after(seconds: 60)) == .exited(0))
        let whole = Double(monotonicNanoseconds() - start) / 1000
        var previous: UInt64? = 1
        var outcomes = (old: 0, new: 0)
        for seed: UInt64 in 2...4 {
            let client = try ChildProcess(
                executable: ringfenceBinary, arguments: v + ["verify", "--size", "12M", "--seed", "\(seed)"],
                stdout: open("/dev/null", O_WRONLY))
            usleep(UInt32(Double.random(in: 0.2...0.7) * whole))
            client.kill()
            let driver = try server.connect()
            defer { driver.close() }
            let key = try #require(FileManager.default.contents(atPath: dir + "/key"))
            let device = try VerifiedBlockDevice.open(transport: driver, key: [UInt8](key), anchorPath: dir + "/anchor")
            let all = try device.read(block: 0, count: blocks)
            let new = verifyPattern(seed: seed, count: blocks * 4096)
            let old =
                previous.map { verifyPattern(seed: $0, count: blocks * 4096) }
                ?? [UInt8](repeating: 0, count: blocks * 4096)
            for b in 0..<blocks {
                let range = (b * 4096)..<((b + 1) * 4096)
                if all[range] == new[range] {
                    outcomes.new += 1
                } else if all[range] == old[range] {
                    outcomes.old += 1
                } else {
                    Issue.record("seed \(seed): block \(b) is neither the old nor the new pattern")
                    return
                }
            }
            // Make this round's state the next round's "old": finish the pattern.
            try device.write(block: 0, bytes: new)
            try device.flush()
            previous = seed
        }
        print("client crash test: blocks found new \(outcomes.new), old \(outcomes.old)")
    }
}

/// `ringfence blk verify`'s pattern (splitmix64 per 8-byte word, keyed by offset).
func verifyPattern(seed: UInt64, count: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        var z = seed &+ UInt64(i) &* 0x9e37_79b9_7f4a_7c15
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        z ^= z >> 31
        for k in 0..<min(8, count - i) { bytes[i + k] = UInt8(truncatingIfNeeded: z >> (8 * UInt64(k))) }
        i += 8
    }
    return bytes
}
