import Foundation
import RingTestSupport
import Testing

/// `ringfence serve-fs` as a user runs it, with `ringfence fs` as the client: a read-only
/// export refuses changes, and SIGTERM ends it cleanly with the socket removed.
@Suite(.serialized, .enabled(if: ringfenceBuilt, "the ringfence binary is missing"))
struct ServeFsCommandTests {
    @Test func readOnlyExportAndCleanShutdown() throws {
        let bin = try #require(Interop.ringfenceBinary)
        let work = "/dev/shm/rf-serve-fs-\(getpid())"
        let shared = "\(work)/shared"
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        try Data("served".utf8).write(to: URL(fileURLWithPath: "\(shared)/f"))
        let socket = "\(work)/fs.sock"
        let server = Process()
        server.executableURL = URL(fileURLWithPath: bin)
        server.arguments = ["serve-fs", "--socket", socket, "--dir", shared, "--readonly", "--log-level", "error"]
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer { if server.isRunning { server.terminate() } }
        ListeningSocket.wait(socket, seconds: 10)

        let cat = try ringfence(["fs", "--socket", socket, "cat", "f"])
        #expect(cat.status == 0)
        #expect(cat.stdout == "served")
        let mkdir = try ringfence(["fs", "--socket", socket, "mkdir", "d"])
        #expect(mkdir.status == 1)
        #expect(mkdir.stderr == "ringfence fs: error: device answered EROFS (30)\n")
        let ls = try ringfence(["fs", "--socket", socket, "ls"])
        #expect(ls.stdout == "f\n")

        server.terminate()
        server.waitUntilExit()
        #expect(server.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: socket), "socket removed on SIGTERM")
    }

    @Test func missingDirectoryExitsOne() throws {
        let r = try ringfence(["serve-fs", "--socket", "/dev/shm/rf-nosock-\(getpid())", "--dir", "/nonexistent/dir"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("open(/nonexistent/dir)"))
    }
}
