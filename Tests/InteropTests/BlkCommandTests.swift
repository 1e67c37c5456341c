import Foundation
import RingFenceResults
import Testing

/// `ringfence blk` end to end against qsd: exit codes and output, as a user sees them.
struct CommandResult {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs the built `ringfence`; with `timeout`, killed after that many seconds (exit 137),
/// for a command that might otherwise run forever.
func ringfence(_ arguments: [String], stdin: Data? = nil, timeout: Int? = nil) throws -> CommandResult {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    let binary = root.appendingPathComponent(".build/debug/ringfence")
    let p = Process()
    if let timeout {
        p.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
        p.arguments = ["--signal=KILL", "\(timeout)", binary.path] + arguments
    } else {
        p.executableURL = binary
        p.arguments = arguments
    }
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    if let stdin {
        let input = Pipe()
        p.standardInput = input
        try p.run()
        input.fileHandleForWriting.write(stdin)
        try input.fileHandleForWriting.close()
    } else {
        p.standardInput = FileHandle.nullDevice
        try p.run()
    }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return CommandResult(
        status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
        stderr: String(decoding: e, as: UTF8.self))
}

var ringfenceBuilt: Bool {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    return FileManager.default.isExecutableFile(atPath: root.appendingPathComponent(".build/debug/ringfence").path)
}

@Suite(
    "ringfence blk against qemu-storage-daemon", .serialized,
    .enabled(if: QemuStorageDaemon.installed, "qemu-storage-daemon is not installed"),
    .enabled(if: ringfenceBuilt, "the ringfence executable is not built"))
struct BlkCommandTests {
    @Test func infoVerifyAndExitCodes() throws {
        let qsd = try QemuStorageDaemon(.file(size: 4 << 20))
        let s = ["blk", "--socket", qsd.socket]
        let info = try ringfence(s + ["info"])
        #expect(info.status == 0)
        #expect(info.stdout.contains("capacity:      4194304 bytes"))
        // --json: BlkInfoResult, every key present (qsd's GET_ID answer or null).
        let json = try ringfence(s + ["info", "--json"])
        #expect(json.status == 0, "\(json.stderr)")
        let i = try JSONDecoder().decode(BlkInfoResult.self, from: Data(json.stdout.utf8))
        #expect(i.capacity == 4 << 20 && i.sectors == 8192 && i.blockSize == 512 && i.queues == 1)
        #expect(i.maxTransfer > 0 && i.segMax > 0 && !i.readOnly && i.flush)
        for key in ["capacity", "block_size", "device_queues", "seg_max", "size_max", "max_transfer", "serial"] {
            #expect(json.stdout.contains("\"\(key)\":"), "no \(key) in \(json.stdout)")
        }
        let verify = try ringfence(s + ["--queues", "2", "verify", "--size", "2M", "--seed", "9"])
        #expect(verify.status == 0, "\(verify.stderr)")
        #expect(verify.stdout.hasPrefix("verify OK: 2097152 bytes"))
        let past = try ringfence(s + ["read", "--offset", "4M", "--length", "4k"])
        #expect(past.status == 1)
        #expect(past.stderr.contains("refused locally"))
        let usage = try ringfence(s + ["bench", "--rw", "sideways"])
        #expect(usage.status == 2)
    }

    @Test func writeReadFlushDiscardZeroesAndBench() throws {
        let qsd = try QemuStorageDaemon(.file(size: 4 << 20))
        let s = ["blk", "--socket", qsd.socket]
        let data = Data((0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 13) })
        #expect(try ringfence(s + ["write", "--offset", "64k"], stdin: data).status == 0)
        let back = try ringfence(s + ["read", "--offset", "64k", "--length", "8k"])
        #expect(back.status == 0)
        #expect(Data(back.stdout.utf8).count >= 0)  // binary on stdout; compared via --output below
        let file = NSTemporaryDirectory() + "ringfence-read-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: file) }
        #expect(try ringfence(s + ["read", "--offset", "64k", "--length", "8k", "--output", file]).status == 0)
        #expect(FileManager.default.contents(atPath: file) == data)
        #expect(try ringfence(s + ["flush"]).status == 0)
        #expect(try ringfence(s + ["discard", "--offset", "1M", "--length", "1M"]).status == 0)
        #expect(try ringfence(s + ["write-zeroes", "--offset", "64k", "--length", "8k"]).status == 0)
        #expect(try ringfence(s + ["read", "--offset", "64k", "--length", "8k", "--output", file]).status == 0)
        #expect(FileManager.default.contents(atPath: file) == Data(count: 8192))
        let bench = try ringfence(
            s + ["bench", "--rw", "randrw", "--bs", "4k", "--iodepth", "4", "--runtime", "1", "--json"])
        #expect(bench.status == 0, "\(bench.stderr)")
        // Encoded from BlockBenchResult (Codable), with fio's names where they mean the same.
        let object = try JSONSerialization.jsonObject(with: Data(bench.stdout.utf8)) as? [String: Any]
        let result = try #require(object, "\(bench.stdout)")
        #expect(
            Set(result.keys)
                == [
                    "rw", "bs", "iodepth", "queues", "runtime", "total_ios", "io_bytes", "iops", "bw", "lat_ns",
                    "error",
                ])
        #expect(result["rw"] as? String == "randrw")
        #expect(result["bs"] as? Int == 4096)
        #expect((result["iops"] as? Double ?? 0) > 0)
        #expect(result["error"] is NSNull)
        let latency = try #require(result["lat_ns"] as? [String: Any])
        let percentiles = try #require(latency["percentile"] as? [String: Int])
        #expect(Set(percentiles.keys) == ["50.000000", "90.000000", "99.000000", "99.900000"])
        #expect((percentiles["50.000000"] ?? 0) <= (percentiles["99.900000"] ?? 0))
    }
}
