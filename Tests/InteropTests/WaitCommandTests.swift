import Foundation
import SharedMemory
import RingTestSupport
import Testing
import VirtioBlock
import VirtioFS

#if canImport(Glibc)
import Glibc
#endif

/// `--poll` and `--spin-us N` on both ends of a real vhost-user-blk connection (issue 19):
/// `ringfence serve-blk` and `ringfence blk` in child processes, every pairing verifies.
@Suite(.serialized)
struct WaitCommandTests {
    @Test(arguments: [["--poll"], ["--spin-us", "0"], ["--spin-us", "50"], []])
    func everyWaitStrategyServesAndDrives(wait: [String]) throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let dir = "/tmp/rf-wait-\(getpid())-\(wait.joined())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/d.img", contents: Data(count: 4 << 20)))
        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments =
            ["serve-blk", "--socket", dir + "/s.sock", "--image", dir + "/d.img", "--log-level", "error"] + wait
        try server.run()
        defer {
            kill(server.processIdentifier, SIGTERM)
            server.waitUntilExit()
        }
        ListeningSocket.wait(dir + "/s.sock", seconds: 10)
        let r = try Interop.run([binary, "blk", "--socket", dir + "/s.sock"] + wait + ["verify", "--size", "1M"])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("verify OK: 1048576 bytes"), "\(r.output)")
    }

    @Test func pollAndSpinTogetherAreAUsageError() throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let r = try Interop.run([binary, "blk", "--socket", "/tmp/none.sock", "--poll", "--spin-us", "5", "info"])
        #expect(r.status == 2, "\(r.output)")
        #expect(r.output.contains("give --poll or --spin-us, not both"))
    }

    /// The device side with a connected front-end that sends nothing: the default waits
    /// on the kick eventfd (next to no CPU), `--poll` keeps polling the ring.
    @Test func idleDeviceCostsNextToNoCPUUnlessPolling() throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let dir = "/tmp/rf-wait-idle-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/d.img", contents: Data(count: 1 << 20)))
        func idleLoad(_ wait: [String]) throws -> ProcessLoad {
            let server = Process()
            server.executableURL = URL(fileURLWithPath: binary)
            server.arguments =
                ["serve-blk", "--socket", dir + "/s.sock", "--image", dir + "/d.img", "--log-level", "error"] + wait
            try server.run()
            defer {
                kill(server.processIdentifier, SIGTERM)
                server.waitUntilExit()
            }
            ListeningSocket.wait(dir + "/s.sock", seconds: 10)
            var options = VirtioBlockDriver.Options()
            options.controlTimeout = 5
            let disk = try VirtioBlockDriver.connect(socket: dir + "/s.sock", options: options)
            defer { disk.close() }
            _ = try disk.read(at: 0, count: 4096)
            usleep(200_000)  // past any spin
            return ProcessLoad.measure(server.processIdentifier, seconds: 2)
        }
        let adaptive = try idleLoad([])
        let polling = try idleLoad(["--poll"])
        #expect(
            adaptive.cpuSeconds >= 0 && adaptive.cpuSeconds < 0.1,
            "idle for 2 s with a front-end connected: \(adaptive.cpuSeconds) CPU s")
        // Runnable, not CPU seconds: a poller that yields gets little CPU on a loaded machine.
        #expect(polling.runnableFraction > 0.8, "--poll keeps a thread runnable: \(polling)")
    }

    /// `serve-fs --poll` / `--spin-us N`: every strategy serves our fs driver (a file put
    /// and read back through `ringfence fs`).
    @Test(arguments: [["--poll"], ["--spin-us", "0"], ["--spin-us", "50"], []])
    func everyWaitStrategyServesFS(wait: [String]) throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let dir = "/tmp/rf-wait-fs-\(getpid())-\(wait.joined())"
        try FileManager.default.createDirectory(atPath: dir + "/shared", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments =
            ["serve-fs", "--socket", dir + "/s.sock", "--dir", dir + "/shared", "--log-level", "error"] + wait
        try server.run()
        defer {
            kill(server.processIdentifier, SIGTERM)
            server.waitUntilExit()
        }
        ListeningSocket.wait(dir + "/s.sock", seconds: 10)
        var options = VirtioFSDriver.Options()
        options.controlTimeout = 5
        let fs = try VirtioFSDriver.connect(socket: dir + "/s.sock", options: options)
        defer { fs.close() }
        let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try fs.writeFile("f", bytes: data)
        #expect(try fs.readFile("f") == data)
        #expect(FileManager.default.contents(atPath: dir + "/shared/f") == Data(data))
    }

    /// serve-fs idle with a connected driver: the default costs next to no CPU, `--poll`
    /// keeps polling the request queue.
    @Test func idleFSDeviceCostsNextToNoCPUUnlessPolling() throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let dir = "/tmp/rf-wait-fs-idle-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir + "/shared", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func idleLoad(_ wait: [String]) throws -> ProcessLoad {
            let server = Process()
            server.executableURL = URL(fileURLWithPath: binary)
            server.arguments =
                ["serve-fs", "--socket", dir + "/s.sock", "--dir", dir + "/shared", "--log-level", "error"] + wait
            try server.run()
            defer {
                kill(server.processIdentifier, SIGTERM)
                server.waitUntilExit()
            }
            ListeningSocket.wait(dir + "/s.sock", seconds: 10)
            var options = VirtioFSDriver.Options()
            options.controlTimeout = 5
            let fs = try VirtioFSDriver.connect(socket: dir + "/s.sock", options: options)
            defer { fs.close() }
            _ = try fs.stat("/")
            usleep(200_000)  // past any spin
            return ProcessLoad.measure(server.processIdentifier, seconds: 2)
        }
        let adaptive = try idleLoad([])
        let polling = try idleLoad(["--poll"])
        #expect(
            adaptive.cpuSeconds >= 0 && adaptive.cpuSeconds < 0.1,
            "idle for 2 s with a driver connected: \(adaptive.cpuSeconds) CPU s")
        // Runnable, not CPU seconds: a poller that yields gets little CPU on a loaded machine.
        #expect(polling.runnableFraction > 0.8, "--poll keeps a thread runnable: \(polling)")
    }
}
