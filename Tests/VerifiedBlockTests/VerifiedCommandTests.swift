import Foundation
import SharedMemory
import Testing

struct CommandOutput {
    let status: Int32
    let stdout: String
    let stderr: String
}

func runRingfence(_ arguments: [String], stdin: Data? = nil) throws -> CommandOutput {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: ringfenceBinary)
    p.arguments = arguments
    let out = Pipe()
    let err = Pipe()
    p.standardOutput = out
    p.standardError = err
    let input = Pipe()
    p.standardInput = stdin == nil ? FileHandle.nullDevice : input
    try p.run()
    if let stdin {
        input.fileHandleForWriting.write(stdin)
        try input.fileHandleForWriting.close()
    }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return CommandOutput(
        status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
        stderr: String(decoding: e, as: UTF8.self))
}

/// A temporary directory with an image of `size` bytes.
final class Scratch {
    let dir: String
    init(size: Int) throws {
        dir = NSTemporaryDirectory() + "vb-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: image, contents: nil)
        _ = truncate(image, off_t(size))
    }
    var image: String { dir + "/disk.img" }
    deinit { try? FileManager.default.removeItem(atPath: dir) }
}

/// Flips one byte of a file in place (the back-end's disk, behind its back).
func flipByte(_ path: String, at offset: UInt64) throws {
    let h = try #require(FileHandle(forUpdatingAtPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    let b = try #require(try h.read(upToCount: 1)?.first)
    try h.seek(toOffset: offset)
    try h.write(contentsOf: Data([b ^ 0x40]))
}

@Suite(
    "ringfence blk / xen-blk in verified and verity mode, against real back-ends", .serialized,
    .enabled(if: ringfenceBinaryBuilt, "the ringfence executable is not built"))
struct VerifiedCommandTests {
    @Test func blkVerifiedOverServeBlkCatchesATamperedImage() throws {
        let s = try Scratch(size: 2 << 20)
        let server = try ServeBlk(image: s.image, socket: s.dir + "/blk.sock")
        defer { server.stop() }
        let v = ["blk", "--socket", server.socket, "--key", s.dir + "/key", "--anchor", s.dir + "/anchor"]
        let format = try runRingfence(v + ["format"])
        #expect(format.status == 0, "\(format.stderr)")
        #expect(format.stdout.contains("formatted: 227 verified blocks"))
        let verify = try runRingfence(v + ["verify", "--size", "256k"])
        #expect(verify.status == 0, "\(verify.stderr)")
        #expect(verify.stdout.hasPrefix("verify OK (verified): 262144 bytes"))
        let data = Data((0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 13) })
        #expect(try runRingfence(v + ["write", "--offset", "400k"], stdin: data).status == 0)
        let file = s.dir + "/out"
        #expect(try runRingfence(v + ["read", "--offset", "400k", "--length", "8k", "--output", file]).status == 0)
        #expect(FileManager.default.contents(atPath: file) == data)
        // Block 100 was written once: its slot 0 holds it. Flip a byte of its sealed data.
        try flipByte(s.image, at: 4096 + 2 * 100 * 4608 + 77)
        let lie = try runRingfence(v + ["read", "--offset", "400k", "--length", "4k"])
        #expect(lie.status == 1)
        #expect(lie.stderr.contains("R3 (validate before use): verified block 100"), "\(lie.stderr)")
        #expect(lie.stderr.contains("(tag mismatch)"))
        #expect(lie.stdout.isEmpty, "no unverified byte reaches the caller")
        // The plain driver returns the flipped byte without a word.
        let plain = try runRingfence(["blk", "--socket", server.socket, "read", "--offset", "4k", "--length", "4k"])
        #expect(plain.status == 0)
        let usage = try runRingfence(["blk", "--socket", server.socket, "--key", "k", "info"])
        #expect(usage.status == 2)
        #expect(try runRingfence(v + ["discard", "--offset", "0", "--length", "4k"]).status == 2)
        #expect(try runRingfence(v + ["flush"]).stdout == "flushed\n")
    }

    @Test func sealedImageServedAndCheckedAgainstTheRootHash() throws {
        let s = try Scratch(size: 0)
        try Data((0..<(300 * 4096)).map { UInt8(truncatingIfNeeded: $0 >> 3) }).write(to: URL(fileURLWithPath: s.image))
        let seal = try runRingfence(["seal", s.image])
        #expect(seal.status == 0, "\(seal.stderr)")
        let root = seal.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(root.count == 64)
        let server = try ServeBlk(image: s.image, socket: s.dir + "/blk.sock")
        defer { server.stop() }
        let ok = try runRingfence(["blk", "--socket", server.socket, "--root-hash", root, "verify", "--size", "1200k"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("verify OK (verity): 1228800 bytes"))
        var wrong = Array(root)
        wrong[0] = wrong[0] == "0" ? "1" : "0"
        let bad = try runRingfence(["blk", "--socket", server.socket, "--root-hash", String(wrong), "info"])
        #expect(bad.status == 1)
        #expect(bad.stderr.contains("does not lead to the given root hash"))
        try flipByte(s.image, at: 200 * 4096 + 5)
        let lie = try runRingfence([
            "blk", "--socket", server.socket, "--root-hash", root, "read", "--offset", "800k", "--length", "4k",
        ])
        #expect(lie.status == 1)
        #expect(lie.stderr.contains("verity: data block 200 at level 0 does not match its hash"), "\(lie.stderr)")
        let write = try runRingfence(
            ["blk", "--socket", server.socket, "--root-hash", root, "write", "--offset", "0"], stdin: Data(count: 4096))
        #expect(write.status == 1)
        #expect(write.stderr.contains("read-only"))
    }

    @Test func xenBlkVerifiedOverServeXenBlk() throws {
        let s = try Scratch(size: 2 << 20)
        let socket = s.dir + "/xen.sock"
        let server = try ChildProcess(
            executable: ringfenceBinary, arguments: ["serve-xen-blk", "--socket", socket, "--image", s.image],
            stdout: open("/dev/null", O_WRONLY))
        defer {
            _ = kill(server.pid, SIGTERM)
            if server.wait(until: .after(seconds: 3)) == nil { server.kill() }
        }
        let end = Deadline.after(seconds: 10)
        while !FileManager.default.fileExists(atPath: socket) && !end.hasPassed { usleep(10_000) }
        usleep(50_000)
        let v = ["xen-blk", "--socket", socket, "--key", s.dir + "/key", "--anchor", s.dir + "/anchor"]
        let format = try runRingfence(v + ["format"])
        #expect(format.status == 0, "\(format.stderr)")
        #expect(format.stdout.contains("formatted: 227 verified blocks"))
        let verify = try runRingfence(v + ["verify", "--size", "44k", "--seed", "5"])
        #expect(verify.status == 0, "\(verify.stderr)")
        #expect(verify.stdout.hasPrefix("verify OK (verified): 45056 bytes"))
        // Block 3 was written once (slot 0): an older version cannot be replayed, a flipped bit is caught.
        try flipByte(s.image, at: 4096 + 2 * 3 * 4608 + 4000)
        let lie = try runRingfence(v + ["read", "--offset", "12k", "--length", "4k"])
        #expect(lie.status == 1)
        #expect(
            lie.stderr.contains("verified block 3: sealed data does not authenticate (tag mismatch)"), "\(lie.stderr)")
    }

    @Test func xenBlkVerityOverServeXenBlk() throws {
        let s = try Scratch(size: 0)
        try Data((0..<(64 * 4096)).map { UInt8(truncatingIfNeeded: $0 &* 3) }).write(to: URL(fileURLWithPath: s.image))
        let seal = try runRingfence(["seal", s.image])
        #expect(seal.status == 0, "\(seal.stderr)")
        let root = seal.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let socket = s.dir + "/xen.sock"
        let server = try ChildProcess(
            executable: ringfenceBinary, arguments: ["serve-xen-blk", "--socket", socket, "--image", s.image],
            stdout: open("/dev/null", O_WRONLY))
        defer {
            _ = kill(server.pid, SIGTERM)
            if server.wait(until: .after(seconds: 3)) == nil { server.kill() }
        }
        let end = Deadline.after(seconds: 10)
        while !FileManager.default.fileExists(atPath: socket) && !end.hasPassed { usleep(10_000) }
        usleep(50_000)
        let ok = try runRingfence(["xen-blk", "--socket", socket, "--root-hash", root, "verify", "--size", "44k"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("verify OK (verity): 45056 bytes"))
        try flipByte(s.image, at: 3 * 4096 + 1)
        let lie = try runRingfence([
            "xen-blk", "--socket", socket, "--root-hash", root, "read", "--offset", "12k", "--length", "4k",
        ])
        #expect(lie.status == 1)
        #expect(lie.stderr.contains("verity: data block 3 at level 0 does not match its hash"), "\(lie.stderr)")
    }
}
