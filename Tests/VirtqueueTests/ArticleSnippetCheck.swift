import RingTestSupport
import Testing
import Virtqueue

/// The code of the Virtqueue article "Post and complete requests" (the driver's half), run
/// as written: nothing completes until a device serves the chain.
@Test func articlePostAndCompleteRequestsRuns() throws {
    let pair = try RingPair(queueSize: 256, features: RingFeatures(eventIndex: true))
    let out = try #require(pair.pool.allocate(64))
    let back = try #require(pair.pool.allocate(72))
    try pair.driver.add(
        [
            pair.pool.segment(out, deviceWritable: false),
            pair.pool.segment(back, deviceWritable: true),
        ], token: 1)
    _ = pair.driver.publish()
    #expect(try pair.driver.nextCompletion() == nil)
}
