import Foundation
import RingTestSupport
import Testing
import VirtioBlock

/// The async calls against `ringfence serve-blk` as a separate process (issue 20): hundreds
/// of concurrent awaiting reads from a task group, each returning its own block.
@Suite struct ServeBlkAsyncTests {
    @Test(.timeLimit(.minutes(5))) func hundredsOfAwaitingReadsAgainstServeBlkProcess() async throws {
        guard let binary = Interop.ringfenceBinary else {
            Issue.record("ringfence binary not built (swift build first)")
            return
        }
        let dir = "/tmp/rf-async-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/d.img", contents: Data(count: 1 << 20)))
        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments = [
            "serve-blk", "--socket", dir + "/s.sock", "--image", dir + "/d.img", "--log-level", "error",
        ]
        try server.run()
        defer {
            kill(server.processIdentifier, SIGTERM)
            server.waitUntilExit()
        }
        ListeningSocket.wait(dir + "/s.sock", seconds: 10)
        let disk = try VirtioBlockDriver.connect(socket: dir + "/s.sock")
        defer { disk.close() }
        func block(_ i: Int) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) } }
        for i in 0..<64 { try await disk.write(at: UInt64(i) * 4096, bytes: block(i)) }
        let correct = try await withThrowingTaskGroup(of: Bool.self) { group in
            for r in 0..<300 {
                group.addTask { try await disk.read(at: UInt64(r % 64) * 4096, count: 4096) == block(r % 64) }
            }
            return try await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(correct == 300)
        #expect(!disk.isBroken)
    }
}
