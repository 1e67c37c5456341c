import BlockBench
import Foundation
import RingFenceResults
import RingTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// One CLI style across the transport commands (issue 19): subcommands, byte sizes,
/// `--json` decoded back through the Codable types, exit 0 / 1 / 2. Each against a real
/// server in a child process.
@Suite(
    "transport commands: one shape", .serialized,
    .enabled(if: ringfenceBuilt, "the ringfence executable is not built"))
struct TransportCommandTests {
    /// A `ringfence` server in a child process, stopped with SIGTERM at the end.
    final class Server {
        let process = Process()
        let dir: String
        let socket: String

        init(_ arguments: (String) -> [String], name: String) throws {
            dir = "/tmp/rf-shape-\(getpid())-\(name)"
            try? FileManager.default.removeItem(atPath: dir)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            socket = dir + "/s.sock"
            let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
                .deletingLastPathComponent()
            process.executableURL = root.appendingPathComponent(".build/debug/ringfence")
            process.arguments = arguments(socket)
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            ListeningSocket.wait(socket, seconds: 10)
        }

        deinit {
            if process.isRunning {
                // SIGKILL: a child of the test process inherits its blocked SIGTERM.
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
            }
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    static func decode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(text.utf8))
    }

    /// xen-blk has blk's subcommands and byte sizes; a transfer larger than one blkif
    /// request (44 KiB) is split into several.
    @Test func xenBlkSubcommandsByteSizesAndSplitting() throws {
        let server = try Server({ ["serve-xen-blk", "--socket", $0, "--memory-sectors", "8192"] }, name: "xen-blk")
        let s = ["xen-blk", "--socket", server.socket]
        let info = try ringfence(s + ["info", "--json"])
        #expect(info.status == 0, "\(info.stderr)")
        let i = try Self.decode(XenBlkInfoResult.self, info.stdout)
        #expect(i.capacity == 4 << 20 && i.sectors == 8192 && i.maxTransfer == 45056 && i.ringSlots == 32)
        // 100 KiB + 512: three requests of at most 44 KiB, at an offset that is not 4 KiB aligned.
        let data = Data((0..<(100 * 1024 + 512)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11) })
        let input = server.dir + "/in.bin"
        let output = server.dir + "/out.bin"
        try data.write(to: URL(fileURLWithPath: input))
        let write = try ringfence(s + ["write", "--offset", "1536", "--input", input])
        #expect(write.status == 0, "\(write.stderr)")
        #expect(write.stdout == "wrote 102912 bytes at 1536\n")
        let read = try ringfence(s + ["read", "--offset", "1536", "--length", "102912", "--output", output])
        #expect(read.status == 0, "\(read.stderr)")
        #expect(FileManager.default.contents(atPath: output) == data)
        let verify = try ringfence(s + ["verify", "--size", "1M", "--seed", "3"])
        #expect(verify.status == 0, "\(verify.stderr)")
        #expect(verify.stdout.hasPrefix("verify OK: 1048576 bytes, seed 3"))
        #expect(try ringfence(s + ["flush"]).stdout == "flushed\n")
        #expect(try ringfence(s + ["discard", "--offset", "1M", "--length", "64k"]).status == 0)
        let bench = try ringfence(
            s + ["--poll", "bench", "--rw", "randrw", "--bs", "16k", "--iodepth", "8", "--runtime", "0.3", "--json"])
        #expect(bench.status == 0, "\(bench.stderr)")
        #expect(bench.stderr.isEmpty, "no progress line with --json or without a terminal: \(bench.stderr)")
        let b = try Self.decode(BlockBenchResult.self, bench.stdout)
        #expect(b.rw == "randrw" && b.bs == 16384 && b.iodepth == 8 && b.queues == 1)
        #expect(b.totalIos > 0 && b.ioBytes == b.totalIos * 16384 && b.iops > 0 && b.error == nil)
        #expect((b.latNs?.percentile["99.000000"] ?? 0) > 0)
        let text = try ringfence(s + ["bench", "--runtime", "0.2"])
        #expect(text.status == 0)
        #expect(text.stdout.hasPrefix("randread: bs=4096 iodepth=16 queues=1"), "\(text.stdout)")
    }

    @Test func xenBlkUsageErrorsExitTwoAndDeviceErrorsOne() throws {
        let server = try Server({ ["serve-xen-blk", "--socket", $0, "--memory-sectors", "64"] }, name: "xen-blk-err")
        let s = ["xen-blk", "--socket", server.socket]
        for bad in [
            ["read", "--offset", "100", "--length", "4k"], ["read", "--offset", "0", "--length", "0"],
            ["bench", "--bs", "48k"], ["bench", "--iodepth", "33"], ["bench", "--runtime", "0"],
            ["--poll", "--spin-us", "3", "info"], ["verify", "--count", "8"],
        ] {
            let r = try ringfence(s + bad)
            #expect(r.status == 2, "\(bad): \(r.stderr)")
        }
        #expect(try ringfence(s + ["--sector", "0", "read"]).status == 2, "the positional-action spelling is gone")
        let past = try ringfence(s + ["read", "--offset", "32k", "--length", "4k"])
        #expect(past.status == 1)
        #expect(past.stderr.hasPrefix("ringfence xen-blk: error: "), "\(past.stderr)")
        let gone = try ringfence(["xen-blk", "--socket", server.dir + "/none.sock", "--timeout", "0.5", "info"])
        #expect(gone.status == 1)
        #expect(gone.stderr.hasPrefix("ringfence xen-blk: error: "), "\(gone.stderr)")
    }

    /// A backend that answers with a response id it never got: the frontend names the rule, exit 1.
    @Test func xenBlkAgainstAnAttackingBackendExitsOneNamingTheRule() throws {
        let server = try Server(
            { ["serve-xen-blk", "--socket", $0, "--memory-sectors", "64", "--attack", "rsp-id-not-in-flight"] },
            name: "xen-blk-attack")
        let r = try ringfence(["xen-blk", "--socket", server.socket, "read", "--offset", "0", "--length", "4k"])
        #expect(r.status == 1)
        #expect(r.stderr.hasPrefix("ringfence xen-blk: error: device disabled: R"), "\(r.stderr)")
    }

    /// net: byte sizes and `--runtime`, `bench --json` decoded as `NetBenchResult`.
    @Test func netBenchJSONAgainstServeNet() throws {
        let server = try Server(
            { ["serve-net", "--socket", $0, "--loopback", "--log-level", "error"] }, name: "net")
        let s = ["net", "--socket", server.socket]
        let info = try ringfence(s + ["info", "--json"])
        #expect(info.status == 0, "\(info.stderr)")
        let i = try Self.decode(NetInfoResult.self, info.stdout)
        #expect(i.mtu == 1500 && i.maxFrame == 1518 && i.linkUp && i.queuePairs == 1 && i.ring == "packed")
        #expect(i.mac.split(separator: ":").count == 6 && i.mergeableRxBuffers)
        let ping = try ringfence(s + ["ping", "--count", "3", "--size", "1k"])
        #expect(ping.status == 0, "\(ping.stderr)")
        #expect(ping.stdout.hasPrefix("3 sent, 3 returned intact"), "\(ping.stdout)")
        let bench = try ringfence(s + ["bench", "--both", "--size", "1k", "--runtime", "0.3", "--json"])
        #expect(bench.status == 0, "\(bench.stderr)")
        #expect(bench.stderr.isEmpty)
        let b = try Self.decode(NetBenchResult.self, bench.stdout)
        #expect(b.direction == "both" && b.size == 1024 && b.txFrames > 0 && b.txMpps > 0 && b.error == nil)
        #expect(b.runtime >= 250 && b.runtime < 2000, "\(b.runtime) ms")
        #expect(try ringfence(s + ["bench", "--runtime", "0"]).status == 2)
        #expect(try ringfence(s + ["bench", "--duration", "1"]).status == 2, "the old spelling is gone")
    }

    /// xen-net: `ping` and `bench --json` decoded as `PingResult` and `NetBenchResult`.
    @Test func xenNetJSONAgainstServeXenNet() throws {
        let server = try Server({ ["serve-xen-net", "--socket", $0, "--loopback"] }, name: "xen-net")
        let s = ["xen-net", "--socket", server.socket]
        let info = try ringfence(s + ["info", "--json"])
        #expect(info.status == 0, "\(info.stderr)")
        #expect(try Self.decode(XenNetInfoResult.self, info.stdout).mac == "00:16:3e:00:00:01")
        let ping = try ringfence(s + ["ping", "--count", "5", "--size", "9k", "--json"])
        #expect(ping.status == 0, "\(ping.stderr)")
        let p = try Self.decode(PingResult.self, ping.stdout)
        #expect(p.sent == 5 && p.received == 5 && p.mismatched == 0 && p.size == 9216)
        let lat = try #require(p.latNs)
        #expect(lat.min > 0 && lat.min <= lat.percentile["50.000000"] ?? 0 && lat.max >= lat.min)
        let bench = try ringfence(s + ["bench", "--runtime", "0.3", "--json"])
        #expect(bench.status == 0, "\(bench.stderr)")
        let b = try Self.decode(NetBenchResult.self, bench.stdout)
        #expect(b.ring == "xen" && b.size == 1500 && b.depth == 32 && b.txFrames > 0 && b.error == nil)
        #expect(try ringfence(s + ["bench", "--seconds", "1"]).status == 2, "the old spelling is gone")
    }
}
