#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SharedMemory
import Testing
import XenRing

/// `serve-xen-blk` and `xen-blk` with `--poll` / `--spin-us N` (issue 19), like
/// serve-blk's WaitCommandTests: every pairing verifies, an idle backend costs next to no CPU
/// unless it polls.
@Suite(.serialized) struct XenWaitCommandTests {
    static func serve(_ wait: [String]) throws -> (ChildProcess, String) {
        let exe = try #require(ringfenceBinary(), "ringfence must be built next to the tests")
        let socket = "/tmp/ringfence-xwait-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let null = open("/dev/null", O_WRONLY)
        defer { close(null) }
        let server = try ChildProcess(
            executable: exe, arguments: ["serve-xen-blk", "--socket", socket, "--memory-sectors", "4096"] + wait,
            stdout: null)
        for _ in 0..<500 where access(socket, F_OK) != 0 { usleep(10_000) }
        return (server, socket)
    }

    @Test(arguments: [["--poll"], ["--spin-us", "0"], ["--spin-us", "50"], []])
    func everyWaitStrategyServesAndDrives(wait: [String]) throws {
        let exe = try #require(ringfenceBinary(), "ringfence must be built next to the tests")
        let (server, socket) = try Self.serve(wait)
        defer {
            _ = server.kill()
            unlink(socket)
        }
        let null = open("/dev/null", O_WRONLY)
        defer { close(null) }
        let client = try ChildProcess(
            executable: exe, arguments: ["xen-blk", "--socket", socket] + wait + ["verify", "--size", "1M"],
            stdout: null)
        #expect(client.wait(until: .after(seconds: 30)) == .exited(0), "\(wait)")
    }

    /// CPU seconds (user + system) a process has used, from /proc/PID/stat.
    static func cpuSeconds(_ pid: Int32) -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return -1 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return -1 }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// A connected frontend that sends nothing: the default blocks on the event channel
    /// (next to no CPU), `--poll` keeps polling the ring.
    @Test func idleBackendCostsNextToNoCPUUnlessPolling() throws {
        func idleCPU(_ wait: [String]) throws -> Double {
            let (server, socket) = try Self.serve(wait)
            defer {
                _ = server.kill()
                unlink(socket)
            }
            let deadline = Deadline.after(seconds: 10)
            let device = try XenBlkFrontendDevice.connect(
                channel: try UnixChannel.connect(path: socket, until: deadline), until: deadline)
            defer { device.disconnect() }
            var page = [UInt8](repeating: 0, count: 4096)
            try page.withUnsafeMutableBytes { try device.read(sector: 0, into: $0) }
            usleep(200_000)  // past any spin
            let before = Self.cpuSeconds(server.pid)
            usleep(2_000_000)
            return Self.cpuSeconds(server.pid) - before
        }
        let adaptive = try idleCPU([])
        let polling = try idleCPU(["--poll"])
        #expect(adaptive >= 0 && adaptive < 0.1, "idle for 2 s with a frontend connected: \(adaptive) CPU s")
        #expect(polling > 5 * max(adaptive, 0.01), "--poll keeps a CPU busy: \(polling) vs \(adaptive) CPU s")
    }
}
