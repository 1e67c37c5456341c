import Foundation
import Testing

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
        let ready = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: dir + "/s.sock") && Date() < ready { usleep(5_000) }
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
}
