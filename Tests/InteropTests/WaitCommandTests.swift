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
    /// A fresh directory under /tmp for one test's socket, with a zeroed `d.img` of `image`
    /// bytes or a `shared/` directory.
    static func directory(_ name: String, image: Int = 0, shared: Bool = false) throws -> String {
        let dir = "/tmp/\(name)-\(getpid())"
        try FileManager.default.createDirectory(
            atPath: shared ? dir + "/shared" : dir, withIntermediateDirectories: true)
        if image > 0 {
            #expect(FileManager.default.createFile(atPath: dir + "/d.img", contents: Data(count: image)))
        }
        return dir
    }

    static func serveBlk(_ dir: String) -> [String] {
        ["serve-blk", "--socket", dir + "/s.sock", "--image", dir + "/d.img", "--log-level", "error"]
    }

    static func serveFS(_ dir: String) -> [String] {
        ["serve-fs", "--socket", dir + "/s.sock", "--dir", dir + "/shared", "--log-level", "error"]
    }

    @Test(arguments: [["--poll"], ["--spin-us", "0"], ["--spin-us", "50"], []])
    func everyWaitStrategyServesAndDrives(wait: [String]) throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let dir = try Self.directory("rf-wait-\(wait.joined())", image: 4 << 20)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try RingfenceServer(Self.serveBlk(dir) + wait, socket: dir + "/s.sock")
        defer { server.stop() }
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
        let dir = try Self.directory("rf-wait-idle", image: 1 << 20)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (adaptive, polling) = try RingfenceServer.idleLoads(Self.serveBlk(dir), socket: dir + "/s.sock") {
            var options = VirtioBlockDriver.Options()
            options.controlTimeout = 5
            let disk = try VirtioBlockDriver.connect(socket: dir + "/s.sock", options: options)
            _ = try disk.read(at: 0, count: 4096)
            return disk.close
        }
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
        let dir = try Self.directory("rf-wait-fs-\(wait.joined())", shared: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try RingfenceServer(Self.serveFS(dir) + wait, socket: dir + "/s.sock")
        defer { server.stop() }
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
        let dir = try Self.directory("rf-wait-fs-idle", shared: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (adaptive, polling) = try RingfenceServer.idleLoads(Self.serveFS(dir), socket: dir + "/s.sock") {
            var options = VirtioFSDriver.Options()
            options.controlTimeout = 5
            let fs = try VirtioFSDriver.connect(socket: dir + "/s.sock", options: options)
            _ = try fs.stat("/")
            return fs.close
        }
        #expect(
            adaptive.cpuSeconds >= 0 && adaptive.cpuSeconds < 0.1,
            "idle for 2 s with a driver connected: \(adaptive.cpuSeconds) CPU s")
        // Runnable, not CPU seconds: a poller that yields gets little CPU on a loaded machine.
        #expect(polling.runnableFraction > 0.8, "--poll keeps a thread runnable: \(polling)")
    }
}
