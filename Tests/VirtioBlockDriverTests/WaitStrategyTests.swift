import Foundation
import RingTestSupport
import SharedMemory
import Testing
import VirtioBlock

/// `VirtioBlockDriver.Options.wait` (issue 19): every strategy serves every request; only
/// the cost of waiting differs. `.poll` never blocks on the call eventfd, `.interrupts`
/// blocks at once; a device that stops answering still times out under `.poll` (R5).
@Suite("driver wait strategies", .serialized)
struct WaitStrategyTests {
    func run(_ strategy: WaitStrategy, reads: Int = 64) throws -> BlockQueueStatistics {
        let backend = try MisbehavingBlockBackend()
        defer { backend.stop() }
        backend.start()
        var options = VirtioBlockDriver.Options()
        options.requestTimeout = 2
        options.controlTimeout = 1
        options.wait = strategy
        let disk = try VirtioBlockDriver.connect(channel: backend.driverChannel, options: options)
        defer { disk.close() }
        let pattern = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 5 &+ 1) }
        try disk.write(at: 4096, bytes: pattern)
        for _ in 0..<reads { #expect(try disk.read(at: 4096, count: 4096) == pattern) }
        #expect(!disk.isBroken)
        return disk.queue(0).statistics
    }

    @Test func pollNeverBlocks() throws {
        let s = try run(.poll)
        #expect(s.completed >= 65)
        #expect(s.blocks == 0)
    }

    @Test func interruptsOnlyBlocksForCompletions() throws {
        let s = try run(.interrupts)
        #expect(s.completed >= 65)
        #expect(s.blocks > 0, "with no spin the driver waits on the call eventfd")
    }

    @Test(arguments: [WaitStrategy.adaptive, .spin(nanoseconds: 50_000)])
    func spinningStrategiesServeEveryRequest(strategy: WaitStrategy) throws {
        #expect(try run(strategy).completed >= 65)
    }

    @Test func adaptiveSpinGrowsWhenBlocksAreShortAndShrinksWhenLong() {
        var spin = AdaptiveSpin(.adaptive)
        #expect(spin.limit == AdaptiveSpin.initial)
        spin.noteBlock(nanoseconds: 10_000, productive: true)
        #expect(spin.limit == 2 * AdaptiveSpin.initial)
        for _ in 0..<10 { spin.noteBlock(nanoseconds: 10_000, productive: true) }
        #expect(spin.limit == AdaptiveSpin.maximum)
        for _ in 0..<40 { spin.noteBlock(nanoseconds: 5_000_000, productive: true) }
        #expect(spin.limit == AdaptiveSpin.minimum, "long blocks: spinning was wasted")
        var fixed = AdaptiveSpin(.spin(nanoseconds: 30_000))
        fixed.noteBlock(nanoseconds: 10, productive: true)
        #expect(fixed.limit == 30_000, "a fixed spin does not adapt")
        #expect(AdaptiveSpin(.poll).limit == .max)
        #expect(AdaptiveSpin(.interrupts).limit == 0)
    }
}
