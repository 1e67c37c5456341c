#if canImport(Glibc)
import Glibc
#endif
import RingTestSupport
import SharedMemory
import Testing
@testable import XenRing

/// `ringfence serve-xen-net` and `ringfence xen-net` as a user runs them: real processes,
/// a real socket, exit codes 0/1/2 and their output.
@Suite(.serialized) struct NetCommandTests {
    /// Runs `ringfence arguments`, waiting at most `seconds`; its exit status and output.
    static func run(_ arguments: [String], seconds: Double = 20) throws -> (Int32?, String) {
        let exe = try #require(ringfenceBinary(), "ringfence must be built next to the tests")
        let path = "/tmp/ringfence-net-out-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        defer {
            close(fd)
            unlink(path)
        }
        let child = try ChildProcess(executable: exe, arguments: arguments, stdout: fd)
        let exit = child.wait(until: .after(seconds: seconds)) ?? child.kill()
        var out = [UInt8](repeating: 0, count: 1 << 16)
        let n = pread(fd, &out, out.count, 0)
        let text = String(decoding: out.prefix(max(0, n)), as: UTF8.self)
        if case .exited(let status)? = exit { return (status, text) }
        return (nil, text)
    }

    /// A server in `mode` for `connections` connections on a fresh socket.
    static func serve(_ mode: String, connections: Int, attack: String? = nil) throws -> (ChildProcess, String) {
        let exe = try #require(ringfenceBinary(), "ringfence must be built next to the tests")
        let socket = "/tmp/ringfence-net-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let server = try ChildProcess(
            executable: exe,
            arguments: ["serve-xen-net", "--socket", socket, "--\(mode)", "--connections", "\(connections)"]
                + (attack.map { ["--attack", $0] } ?? []))
        for _ in 0..<200 where access(socket, F_OK) != 0 { usleep(10_000) }
        return (server, socket)
    }

    @Test func loopbackInfoPingBenchExitZero() throws {
        let (server, socket) = try Self.serve("loopback", connections: 4)
        let info = try Self.run(["xen-net", "--socket", socket, "info"])
        #expect(info.0 == 0)
        #expect(info.1.contains("mac:           00:16:3e:00:00:01"))
        let ping = try Self.run(["xen-net", "--socket", socket, "ping", "--count", "5", "--size", "9k", "--json"])
        #expect(ping.0 == 0)
        #expect(ping.1.contains("\"mismatched\":0,\"received\":5,\"sent\":5,\"size\":9216"))
        let bench = try Self.run(["xen-net", "--socket", socket, "bench", "--runtime", "0.3", "--json"])
        #expect(bench.0 == 0)
        #expect(bench.1.contains("\"size\":1500") && bench.1.contains("\"error\":null"))
        let text = try Self.run(["xen-net", "--socket", socket, "bench", "--runtime", "0.3", "--size", "64"])
        #expect(text.0 == 0)
        #expect(text.1.contains("xen-net bench: 64-byte frames"))
        #expect(server.wait(until: .after(seconds: 10)) == .exited(0))
        unlink(socket)
    }

    @Test func pingWithoutEchoExitsOneAndUsageErrorsExitTwo() throws {
        let (server, socket) = try Self.serve("sink", connections: 1)
        let ping = try Self.run(["xen-net", "--socket", socket, "--timeout", "0.3", "ping", "--count", "1"])
        #expect(ping.0 == 1)
        #expect(ping.1.contains("no reply"))
        #expect(server.wait(until: .after(seconds: 10)) == .exited(0))
        unlink(socket)
        #expect(try Self.run(["xen-net", "--socket", socket, "ping", "--size", "5"]).0 == 2)
        #expect(try Self.run(["xen-net", "--socket", socket, "bench", "--depth", "0"]).0 == 2)
        let gone = try Self.run(["xen-net", "--socket", "/tmp/ringfence-no-such.sock", "--timeout", "0.5", "info"])
        #expect(gone.0 == 1)
        #expect(gone.1.contains("ringfence xen-net: error:"))
    }

    /// A misbehaving netback in another process: the frontend names the rule and exits 1.
    @Test func attackingBackendMakesPingExitOneNamingTheRule() throws {
        let (server, socket) = try Self.serve("loopback", connections: 1, attack: "net-rx-offset-past-page")
        let ping = try Self.run(["xen-net", "--socket", socket, "ping", "--count", "1"])
        #expect(ping.0 == 1)
        #expect(
            ping.1.contains(
                "ringfence xen-net: error: device disabled: R3 (validate before use): rx response 0: offset 4090"))
        #expect(server.wait(until: .after(seconds: 10)) == .exited(0))
        unlink(socket)
        #expect(try Self.run(["serve-xen-net", "--socket", socket, "--attack", "no-such"]).0 == 2)
    }
}
