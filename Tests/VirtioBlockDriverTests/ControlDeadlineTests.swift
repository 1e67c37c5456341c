import Foundation
import RingTestSupport
import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// Issue 13 items 3 and 4: every control send and receive has a deadline, and the
/// caller's `controlTimeout` bounds a whole operation (connect with negotiation and ring
/// set-up, close), not each message.
@Suite("control-plane deadlines", .serialized)
struct ControlDeadlineTests {
    /// A back-end that offers 64 queues and no REPLY_ACK, then never reads: the driver's
    /// ring set-up (hundreds of messages with descriptors) fills the socket. Pre-fix the
    /// sends had no deadline and `connect` never returned.
    @Test func connectToABackendThatStopsReadingEndsAtTheControlDeadline() throws {
        var config = MisbehavingBlockBackend.defaultConfig()
        config.numQueues = 64
        let backend = try MisbehavingBlockBackend(.deafAfter(.getConfig), config: config, queueNum: 64)
        backend.protocolFeatures = [.config, .multiQueue]
        defer { backend.stop() }
        backend.start()
        var options = VirtioBlockDriver.Options()
        options.queues = 64
        options.controlTimeout = 1
        let (error, seconds) = failure { () throws(VirtioError) in
            _ = try VirtioBlockDriver.connect(channel: backend.driverChannel, options: options)
        }
        #expect(error == .timeout(milliseconds: 1000), "got \(String(describing: error))")
        #expect(seconds < 2, "took \(seconds) s")
    }

    /// Closing 16 queues against a back-end that no longer answers costs one control
    /// deadline in all, not one per queue (pre-fix: 16 s here).
    @Test func closeOfManyQueuesAgainstASilentBackendCostsOneDeadline() throws {
        var config = MisbehavingBlockBackend.defaultConfig()
        config.numQueues = 16
        let backend = try MisbehavingBlockBackend(.deafAfter(.getVringBase), config: config, queueNum: 16)
        defer { backend.stop() }
        let disk = try attach(backend, queues: 16)
        #expect(disk.queueCount == 16)
        let start = monotonicNanoseconds()
        disk.close()
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        #expect(seconds < 2, "close took \(seconds) s")
    }
}
