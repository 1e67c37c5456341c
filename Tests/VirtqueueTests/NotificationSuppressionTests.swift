import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// EVENT_IDX and the NO_NOTIFY / NO_INTERRUPT flags. The event index and the flags are
/// written by the peer, so any value (including garbage) must give a defined answer; a
/// wrong "no" loses a wake-up, a wrong "yes" is only a spurious kick.
@Suite struct NotificationSuppressionTests {
    /// The spec's meaning, stated differently from `vring_need_event`: notify iff `event`
    /// lies in the window of indices just published, `[old, new)` modulo 2^16.
    static func reference(event: UInt16, new: UInt16, old: UInt16) -> Bool {
        (event &- old) < (new &- old)
    }

    @Test func needEventTruthTable() {
        // (event, new, old, expected)
        let rows: [(UInt16, UInt16, UInt16, Bool)] = [
            (0, 1, 0, true),  // peer wants a kick at 0, we published 0
            (1, 1, 0, false),  // peer wants one at 1, not published yet
            (0, 0, 0, false),  // nothing published
            (5, 5, 5, false),
            (2, 3, 0, true), (3, 3, 0, false), (0xFFFF, 3, 0, false),
            // wrap-around: published 0xfffe, 0xffff, 0
            (0xFFFE, 1, 0xFFFE, true), (0xFFFF, 1, 0xFFFE, true), (0, 1, 0xFFFE, true),
            (1, 1, 0xFFFE, false), (0xFFFD, 1, 0xFFFE, false), (0x8000, 1, 0xFFFE, false),
            // a stale event far behind: no kick (the peer is not asleep at that index)
            (0x7000, 0x8001, 0x8000, false),
            // the largest window
            (0x7FFF, 0x8000, 0, true), (0x8000, 0x8000, 0, false),
        ]
        for (event, new, old, expected) in rows {
            #expect(SplitLayout.needEvent(event: event, new: new, old: old) == expected, "\(event) \(new) \(old)")
        }
        // Against the reference on a grid of awkward values around every wrap point.
        let points: [UInt16] = [0, 1, 2, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xFFFD, 0xFFFE, 0xFFFF]
        let deltas: [UInt16] = [0, 1, 2, 3, 0x7FFF, 0x8000, 0xFFFF]
        var mismatches = 0
        for old in points {
            for d in deltas {
                let new = old &+ d
                for e in points + points.map({ old &+ $0 }) + points.map({ new &+ $0 }) {
                    if SplitLayout.needEvent(event: e, new: new, old: old)
                        != Self.reference(event: e, new: new, old: old)
                    {
                        mismatches += 1
                    }
                }
            }
        }
        #expect(mismatches == 0)
    }

    @Test func needEventMatchesReferenceOnRandomTriples() {
        var rng = SplitMix(seed: 0x5EED)
        var mismatches = 0
        for _ in 0..<200_000 {
            let v = rng.next()
            let e = UInt16(truncatingIfNeeded: v)
            let n = UInt16(truncatingIfNeeded: v >> 16)
            let o = UInt16(truncatingIfNeeded: v >> 32)
            if SplitLayout.needEvent(event: e, new: n, old: o) != Self.reference(event: e, new: n, old: o) {
                mismatches += 1
            }
        }
        #expect(mismatches == 0)
    }

    // MARK: driver -> device kicks

    @Test(arguments: [
        (1, UInt16(0), true), (1, 1, false), (1, 0xFFFF, false),
        (3, 0, true), (3, 2, true), (3, 3, false), (3, 0xBEEF, false), (3, 0x8000, false),
    ])
    func publishHonoursAvailEventWrittenByDevice(posted: Int, availEvent: UInt16, expected: Bool) throws {
        let pair = try RingPair(queueSize: 8, features: RingFeatures(eventIndex: true))
        let a = RingAttacker(pair)
        for t in 0..<posted { try post(pair, readable: 8, writable: 0, writableSegments: 0, token: UInt64(t)) }
        a.setAvailEvent(availEvent)
        a.setUsedFlags(0xFFFF)  // ignored with EVENT_IDX
        #expect(pair.driver.publish() == expected)
        #expect(a.availIndex == UInt16(posted))
        #expect(pair.driver.publish() == false)  // nothing new
    }

    @Test func publishAcrossIndexWrapUsesEventIndex() throws {
        let pair = try RingPair(queueSize: 8, features: RingFeatures(eventIndex: true))
        let a = RingAttacker(pair)
        let driver = pair.driver
        // Drive the indices to 0xfffe with hand completions.
        let s = Segment(address: pair.pool.guestAddress, length: 8, deviceWritable: false)
        for i in 0..<0xFFFE {
            try driver.add([s], token: 0)
            _ = driver.publish()
            a.complete(slot: UInt16(truncatingIfNeeded: i), id: 0, length: 0)
            _ = try driver.nextCompletion()
        }
        #expect(driver.lastUsed == 0xFFFE && a.availIndex == 0xFFFE)
        for _ in 0..<3 { try driver.add([s], token: 1) }
        a.setAvailEvent(0xFFFF)
        #expect(driver.publish() == true)  // published 0xfffe, 0xffff, 0
        #expect(a.availIndex == 1)
        try driver.add([s], token: 2)
        a.setAvailEvent(0xFFFE)  // stale: the device did not re-arm
        #expect(driver.publish() == false)
        try driver.add([s], token: 3)
        a.setAvailEvent(2)
        #expect(driver.publish() == true)
        #expect(!driver.isBroken)
    }

    @Test func publishOnBrokenQueueDoesNotKick() throws {
        let pair = try RingPair(queueSize: 8)
        try post(pair, token: 1)
        RingAttacker(pair).setUsedIndex(5)
        #expect(throws: Violation.self) { try pair.driver.nextCompletion() }
        #expect(pair.driver.publish() == false)
        #expect(RingAttacker(pair).availIndex == 0)  // nothing was published by the broken queue
    }

    @Test(arguments: [(UInt16(0), true), (1, false), (0xFFFE, true), (0xFFFF, false)])
    func noNotifyFlagWithoutEventIndex(usedFlags: UInt16, expected: Bool) throws {
        let pair = try RingPair(queueSize: 8)
        let a = RingAttacker(pair)
        a.setAvailEvent(1)  // ignored without EVENT_IDX
        try post(pair, token: 1)
        a.setUsedFlags(usedFlags)
        #expect(pair.driver.publish() == expected)
    }

    @Test func deviceDisableAndEnableNotificationsDriveTheKick() throws {
        let pair = try RingPair(queueSize: 8)
        let device = pair.device
        device.disableNotifications()
        try post(pair, token: 1)
        #expect(pair.driver.publish() == false)
        #expect(device.enableNotifications() == true)  // work is already there: poll again
        try post(pair, token: 2)
        #expect(pair.driver.publish() == true)
        var chain = DescriptorChain()
        for _ in 0..<2 { #expect(try device.nextChain(into: &chain, memory: pair.memory) == .ready) }
        #expect(device.enableNotifications() == false)
    }

    @Test func deviceEnableNotificationsWithEventIndexArmsAvailEvent() throws {
        let pair = try RingPair(queueSize: 8, features: RingFeatures(eventIndex: true))
        let a = RingAttacker(pair)
        let device = pair.device
        try post(pair, token: 1)
        try post(pair, token: 2)
        _ = pair.driver.publish()
        var chain = DescriptorChain()
        #expect(try device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(device.enableNotifications() == true)
        #expect(SharedAccess.load16(a.used + SplitLayout.availEventOffset(8)) == 1)
        #expect(try device.nextChain(into: &chain, memory: pair.memory) == .ready)
        #expect(device.enableNotifications() == false)
        #expect(SharedAccess.load16(a.used + SplitLayout.availEventOffset(8)) == 2)
        try post(pair, token: 3)
        #expect(pair.driver.publish() == true)  // the device armed at 2
        try post(pair, token: 4)
        #expect(pair.driver.publish() == false)  // not re-armed
    }

    // MARK: device -> driver interrupts

    @Test func enableInterruptsReportsPendingCompletions() throws {
        for features in [RingFeatures(), RingFeatures(eventIndex: true)] {
            let pair = try RingPair(queueSize: 8, features: features)
            let driver = pair.driver
            #expect(driver.enableInterrupts() == false)
            try post(pair, token: 1)
            _ = driver.publish()
            var echo = EchoDevice()
            _ = try echo.serve(pair.device, memory: pair.memory)
            _ = pair.device.publishUsed()
            #expect(driver.enableInterrupts() == true)  // poll again before sleeping
            #expect(try driver.nextCompletion()?.token == 1)
            #expect(driver.enableInterrupts() == false)
            if features.eventIndex {
                #expect(RingAttacker(pair).usedEvent == driver.lastUsed)
            }
        }
    }

    @Test func usedEventWrittenByDriverDrivesDeviceInterrupt() throws {
        let pair = try RingPair(queueSize: 8, features: RingFeatures(eventIndex: true))
        let driver = pair.driver
        let device = pair.device
        var echo = EchoDevice()
        _ = driver.enableInterrupts()  // used_event = 0
        try post(pair, token: 1)
        _ = driver.publish()
        _ = try echo.serve(device, memory: pair.memory)
        #expect(device.publishUsed() == true)
        #expect(try driver.nextCompletion() != nil)
        // Not re-armed (used_event still 0): the next completion does not interrupt.
        try post(pair, token: 2)
        _ = driver.publish()
        _ = try echo.serve(device, memory: pair.memory)
        #expect(device.publishUsed() == false)
        #expect(try driver.nextCompletion() != nil)
        // Garbage used_event far away: no interrupt, and no trap.
        RingAttacker(pair).setUsedEvent(0x9999)
        try post(pair, token: 3)
        _ = driver.publish()
        _ = try echo.serve(device, memory: pair.memory)
        #expect(device.publishUsed() == false)
        #expect(device.publishUsed() == false)  // nothing new
    }

    @Test func noInterruptFlagWithoutEventIndex() throws {
        let pair = try RingPair(queueSize: 8)
        let driver = pair.driver
        let device = pair.device
        var echo = EchoDevice()
        driver.disableInterrupts()
        try post(pair, token: 1)
        _ = driver.publish()
        _ = try echo.serve(device, memory: pair.memory)
        #expect(device.publishUsed() == false)
        #expect(driver.enableInterrupts() == true)
        #expect(try driver.nextCompletion() != nil)
        try post(pair, token: 2)
        _ = driver.publish()
        _ = try echo.serve(device, memory: pair.memory)
        #expect(device.publishUsed() == true)
    }
}
