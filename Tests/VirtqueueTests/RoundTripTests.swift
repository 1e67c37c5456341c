import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

@Suite struct RoundTripTests {
    /// Posts `payload`, lets the echo device answer, and checks bytes and checksum.
    static func roundTrip(_ pair: RingPair, queue q: Int = 0, payload: [UInt8]) throws -> Completion? {
        let driver = pair.drivers[q]
        let pool = pair.pools[q]
        let out = try #require(pool.allocate(payload.count))
        let back = try #require(pool.allocate(payload.count + EchoDevice.checksumSize))
        payload.withUnsafeBytes { pool.copyIn(out, from: $0) }
        try driver.add(
            [pool.segment(out, deviceWritable: false), pool.segment(back, deviceWritable: true)], token: 7)
        _ = driver.publish()
        var device = EchoDevice()
        _ = try device.serve(pair.devices[q], memory: pair.memory)
        _ = pair.devices[q].publishUsed()
        let completion = try driver.nextCompletion()
        if let completion {
            var answer = [UInt8](repeating: 0, count: payload.count + 8)
            let n = answer.withUnsafeMutableBytes {
                pool.copyOut(back, validatedLength: Int(completion.length), to: $0)
            }
            #expect(n == payload.count + 8)
            #expect(Array(answer[..<payload.count]) == payload.map { $0 ^ 0x5A })
            let sum = payload.withUnsafeBytes { fnv1a($0) }
            let got = answer[payload.count...].enumerated().reduce(UInt64(0)) {
                $0 | UInt64($1.element) << (8 * UInt64($1.offset))
            }
            #expect(got == sum)
        }
        pool.free(out)
        pool.free(back)
        return completion
    }

    @Test(arguments: [RingFeatures(), RingFeatures(eventIndex: true, indirectDescriptors: true)])
    func echoRoundTripDeliversPayloadAndChecksum(features: RingFeatures) throws {
        let pair = try RingPair(queueSize: 8, features: features, indirectEntries: 4)
        for i in 0..<100 {
            let payload = (0..<(1 + i * 37 % 3000)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
            let c = try Self.roundTrip(pair, payload: payload)
            #expect(c?.token == 7)
        }
        #expect(pair.driver.freeCount == 8)
        #expect(pair.pool.bytesInUse == 0)
    }
}
