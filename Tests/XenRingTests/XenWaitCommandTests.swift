#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SharedMemory
import RingTestSupport
import Testing
import XenRing

/// `serve-xen-blk` and `xen-blk` with `--poll` / `--spin-us N` (issue 19), like
/// serve-blk's WaitCommandTests: every pairing verifies, an idle backend costs next to no CPU
/// unless it polls.
@Suite(.serialized) struct XenWaitCommandTests {
    static func socket() -> String { "/tmp/ringfence-xwait-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock" }

    static func serve(_ socket: String) -> [String] {
        ["serve-xen-blk", "--socket", socket, "--memory-sectors", "4096"]
    }

    @Test(arguments: [["--poll"], ["--spin-us", "0"], ["--spin-us", "50"], []])
    func everyWaitStrategyServesAndDrives(wait: [String]) throws {
        let exe = try #require(ringfenceBinary(), "ringfence must be built next to the tests")
        let socket = Self.socket()
        let server = try RingfenceServer(Self.serve(socket) + wait, socket: socket)
        defer { server.stop() }
        let null = open("/dev/null", O_WRONLY)
        defer { close(null) }
        let client = try ChildProcess(
            executable: exe, arguments: ["xen-blk", "--socket", socket] + wait + ["verify", "--size", "1M"],
            stdout: null)
        #expect(client.wait(until: .after(seconds: 30)) == .exited(0), "\(wait)")
    }

    /// A connected frontend that sends nothing: the default blocks on the event channel
    /// (next to no CPU), `--poll` keeps polling the ring.
    @Test func idleBackendCostsNextToNoCPUUnlessPolling() throws {
        let socket = Self.socket()
        let (adaptive, polling) = try RingfenceServer.idleLoads(Self.serve(socket), socket: socket) {
            let deadline = Deadline.after(seconds: 10)
            let device = try XenBlkFrontendDevice.connect(
                channel: try UnixChannel.connect(path: socket, until: deadline), until: deadline)
            var page = [UInt8](repeating: 0, count: 4096)
            try page.withUnsafeMutableBytes { try device.read(sector: 0, into: $0) }
            return device.disconnect
        }
        #expect(
            adaptive.cpuSeconds >= 0 && adaptive.cpuSeconds < 0.1,
            "idle for 2 s with a frontend connected: \(adaptive.cpuSeconds) CPU s")
        // Runnable, not CPU seconds: a poller that yields gets little CPU on a loaded machine.
        #expect(polling.runnableFraction > 0.8, "--poll keeps a thread runnable: \(polling)")
    }
}
