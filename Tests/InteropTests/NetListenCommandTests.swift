import Foundation
import Testing

/// `ringfence net --listen` as a user runs it: no back-end within --accept-timeout is a
/// one-line R5 error and exit 1, and the socket is gone afterwards.
@Suite struct NetListenCommandTests {
    @Test func listenWithoutABackEndTimesOutAtTheAcceptTimeout() throws {
        let bin = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let socket = NSTemporaryDirectory() + "rf-netlisten-cli-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let start = Date()
        let r = try Interop.run([bin, "net", "--socket", socket, "--listen", "--accept-timeout", "0.3", "info"])
        #expect(r.status == 1, "\(r.output)")
        #expect(
            r.output.contains("ringfence net: error: R5 (bounded work): the device did not answer within 300 ms"),
            "\(r.output)")
        #expect(Date().timeIntervalSince(start) < 10)
        #expect(!FileManager.default.fileExists(atPath: socket))
        let bad = try Interop.run([bin, "net", "--socket", socket, "--listen", "--accept-timeout", "0", "info"])
        #expect(bad.status == 2)
        #expect(bad.output.contains("--accept-timeout must be in (0, 3600]"), "\(bad.output)")
    }
}
