import SharedMemory
import Testing

/// The tick clock stamps request deadlines (`BlockQueue`, with `coarseClockSlack` added):
/// it must share the precise clock's time base and never run ahead of it, or deadlines
/// would come early; its usual lag must be within the slack. (The worst case is left to
/// the scheduler: a stalled vCPU delays ticks; a deadline is then that much late.)
@Suite struct CoarseClockTests {
    @Test func coarseClockNeverLeadsAndUsuallyLagsWithinTheSlack() {
        #expect(coarseClockResolution >= 1_000_000)
        #expect(coarseClockResolution <= 100_000_000)
        var lags: [UInt64] = []
        for _ in 0..<20_000 {
            let before = monotonicNanoseconds()
            let coarse = coarseMonotonicNanoseconds()
            let after = monotonicNanoseconds()
            #expect(coarse <= after)
            lags.append(before > coarse ? before - coarse : 0)
        }
        lags.sort()
        #expect(lags[lags.count / 2] <= coarseClockSlack)
        #expect(lags[lags.count - 1] < 1_000_000_000)
    }
}
