#if canImport(Glibc)
import Glibc
#endif
import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// The `ringfence` executable SwiftPM built next to this test bundle.
func ringfenceExecutable() -> String? {
    let me = currentExecutablePath()
    guard let slash = me.lastIndex(of: "/") else { return nil }
    var dir = String(me[..<slash])
    // On Linux the test runner is `<bin>/RingFencePackageTests.xctest`; SwiftPM may also
    // run it from inside a bundle directory.
    for _ in 0..<3 {
        let candidate = dir + "/ringfence"
        if access(candidate, X_OK) == 0 { return candidate }
        guard let s = dir.lastIndex(of: "/") else { break }
        dir = String(dir[..<s])
    }
    return nil
}

@Suite(.serialized) struct TwoProcessTests {
    @Test func payloadsCrossProcessesIntactWithChecksums() throws {
        let exe = try #require(ringfenceExecutable(), "ringfence must be built next to the tests")
        let ring = try TwoProcessRing(executable: exe, queueSize: 64)
        let report = try ring.run(seconds: 30, count: 5000, depth: 16, payloadSize: 512)
        #expect(report.roundTrips == 5000)
        #expect(report.checksumFailures == 0)
        #expect(ring.pair.driver.freeCount == 64)
        #expect(ring.finish() == .exited(0))
    }

    @Test func withoutEventIndexTheFlagsPathAlsoDelivers() throws {
        let exe = try #require(ringfenceExecutable())
        let ring = try TwoProcessRing(executable: exe, queueSize: 16, features: RingFeatures())
        let report = try ring.run(seconds: 30, count: 2000, depth: 8, payloadSize: 100)
        #expect(report.roundTrips == 2000)
        #expect(report.checksumFailures == 0)
        #expect(ring.finish() == .exited(0))
    }

    /// A device process that dies mid-run is an error for the driver, within a deadline.
    @Test func deviceKilledMidRunIsReportedNotHung() throws {
        let exe = try #require(ringfenceExecutable())
        let ring = try TwoProcessRing(executable: exe, queueSize: 16)
        _ = try ring.run(seconds: 30, count: 100, depth: 4, payloadSize: 64)
        kill(ring.childPID, SIGKILL)
        let start = monotonicNanoseconds()
        #expect(throws: TwoProcessError.self) {
            _ = try ring.run(seconds: 30, count: 100, depth: 4, payloadSize: 64)
        }
        #expect(monotonicNanoseconds() - start < 8_000_000_000)
    }
}
