#if canImport(Glibc)
import Glibc
#endif
import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

@Suite(.serialized) struct TwoProcessTests {
    @Test func payloadsCrossProcessesIntactWithChecksums() throws {
        let exe = try #require(ringfenceBinary(), "ringfence must be built next to the tests")
        let ring = try TwoProcessRing(executable: exe, queueSize: 64)
        let report = try ring.run(seconds: 30, count: 5000, depth: 16, payloadSize: 512)
        #expect(report.roundTrips == 5000)
        #expect(report.checksumFailures == 0)
        #expect(ring.pair.driver.freeCount == 64)
        #expect(ring.finish() == .exited(0))
    }

    @Test func withoutEventIndexTheFlagsPathAlsoDelivers() throws {
        let exe = try #require(ringfenceBinary())
        let ring = try TwoProcessRing(executable: exe, queueSize: 16, features: RingFeatures())
        let report = try ring.run(seconds: 30, count: 2000, depth: 8, payloadSize: 100)
        #expect(report.roundTrips == 2000)
        #expect(report.checksumFailures == 0)
        #expect(ring.finish() == .exited(0))
    }

    /// A device process that dies mid-run is an error for the driver, within a deadline.
    @Test func deviceKilledMidRunIsReportedNotHung() throws {
        let exe = try #require(ringfenceBinary())
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
