import Foundation
import RingTestSupport
import Testing

/// `ringfence serve-blk` as a process: SIGINT and SIGTERM end it cleanly (exit 0, socket
/// removed), also right after start-up.
@Suite struct ServeBlkShutdownTests {
    @Test(arguments: [SIGTERM, SIGINT])
    func signalStopsServerAndRemovesSocket(signal: Int32) throws {
        guard let binary = Interop.ringfenceBinary else {
            Issue.record("ringfence binary not built (swift build first)")
            return
        }
        let dir = "/tmp/rf-sig-\(getpid())-\(signal)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/d.img", contents: Data(count: 1 << 20)))
        for _ in 0..<3 {
            let server = Process()
            server.executableURL = URL(fileURLWithPath: binary)
            server.arguments = [
                "serve-blk", "--socket", dir + "/s.sock", "--image", dir + "/d.img", "--log-level", "error",
            ]
            try server.run()
            ListeningSocket.wait(dir + "/s.sock", seconds: 10)
            kill(server.processIdentifier, signal)
            server.waitUntilExit()
            #expect(server.terminationReason == .exit && server.terminationStatus == 0)
            #expect(!FileManager.default.fileExists(atPath: dir + "/s.sock"))
        }
    }
}
