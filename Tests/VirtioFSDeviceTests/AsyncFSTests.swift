import Foundation
import Testing

@testable import VirtioFS

/// Polls `condition` every millisecond until it holds or `seconds` pass.
func eventually(within seconds: Double = 30, _ condition: () throws -> Bool) async throws -> Bool {
    let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < end {
        if try condition() { return true }
        try await Task.sleep(for: .milliseconds(1))
    }
    return try condition()
}

/// The async file-system calls against the real device (`VirtioFSDevice` behind the real
/// `Backend`; `HoldSwitch` makes it answer late). Generous deadlines: on 2 loaded cores
/// the pool may run these tasks long after they were created.
@Suite("async fs calls suspend; cancellation is safe", .serialized)
struct AsyncFSTests {
    /// Every path and node call through the async API; the cleanups they post in the
    /// background (RELEASE, FORGET) reach the device.
    @Test(.timeLimit(.minutes(5))) func asyncCallsRoundTripAndCleanUp() async throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        let fs = try h.connect(requestTimeout: 60)
        defer { fs.close() }
        let data = pattern(3 << 20 + 5, seed: 3)
        try await fs.makeDirectory("d")
        try await fs.writeFile("d/f", bytes: data)
        #expect(FileManager.default.contents(atPath: "\(h.root)/d/f") == Data(data))
        #expect(try await fs.readFile("d/f") == data)
        #expect(try await fs.stat("d/f").size == Int64(data.count))
        #expect(try await fs.listDirectory("d").map(\.name) == ["f"])
        try await fs.rename("d/f", to: "g")
        try await fs.symlink("l", target: "g")
        #expect(try await fs.readLink("l") == "g")
        await #expect(throws: FSError.errno(ENOENT)) { try await fs.stat("d/f") }

        let root = FuseProtocol.rootNodeID
        let (entry, handle) = try await fs.create(parent: root, name: "n", permissions: 0o600)
        #expect(try await fs.write(handle, at: 0, bytes: Array("node".utf8)) == 4)
        try await fs.fsync(handle)
        #expect(try await fs.read(handle, at: 0, count: 16) == Array("node".utf8))
        let changed = try await fs.setAttributes(entry.nodeID, .init(size: 2), handle: handle)
        #expect(changed.size == 2)
        #expect(try await fs.getAttributes(entry.nodeID).size == 2)
        try await fs.flush(handle)
        try await fs.release(handle)
        try await fs.forget(entry.nodeID)
        let sub = try await fs.makeDirectory(parent: root, name: "e")
        try await fs.forget(sub.nodeID)
        try await fs.removeDirectory(parent: root, name: "e")
        try await fs.unlink(parent: root, name: "n")
        #expect(try await fs.statistics().blockSize > 0)

        try await fs.remove("l")
        try await fs.remove("g")
        try await fs.remove("d")
        #expect(try FileManager.default.contentsOfDirectory(atPath: h.root).isEmpty)
        #expect(try await eventually { h.device.held.handles == 0 })
        try fs.flushForgets()
        #expect(try await eventually { h.device.held.inodes == 1 })
        #expect(!fs.isBroken)
        #expect(fs.asyncHeld == 0)
    }

    /// Issue 20 for fs: 400 awaiting READs on a device that holds every answer hold no
    /// pool thread: the pool still runs a ticker while all 400 are parked (with calls
    /// that block, neither the ticker nor the calls would run until the deadline).
    /// Released, every read returns its own file's bytes. Ordering, not timing.
    @Test(.timeLimit(.minutes(5))) func hundredsOfAwaitsOnAHeldDeviceDoNotStarveThePool() async throws {
        let hold = HoldSwitch()
        let h = try FSDeviceHarness(hold: hold)
        defer { h.shutdown() }
        let fs = try h.connect(requestTimeout: 60)
        defer { fs.close() }
        var opened: [FSHandle] = []
        for i in 0..<16 {
            try await fs.writeFile("f\(i)", bytes: pattern(4096 + i, seed: UInt64(i)))
            let e = try await fs.lookup(parent: FuseProtocol.rootNodeID, name: "f\(i)")
            opened.append(try await fs.open(e.nodeID))
        }
        let handles = opened
        hold.hold()
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for r in 0..<400 {
                group.addTask {
                    let i = r % 16
                    return try await fs.read(handles[i], at: 0, count: 8192) == pattern(4096 + i, seed: UInt64(i))
                }
            }
            #expect(try await eventually { fs.asyncHeld == 400 })
            #expect(try await eventually { hold.chainsHeld > 0 })
            for _ in 0..<5 { try await Task.sleep(for: .milliseconds(1)) }
            #expect(fs.asyncHeld == 400)  // the ticker ran while every read was parked
            hold.release()
            var correct = 0
            for try await ok in group where ok { correct += 1 }
            #expect(correct == 400)
        }
        #expect(fs.asyncHeld == 0)
        #expect(!fs.isBroken)
    }

    /// A cancelled READ the device already has returns `CancellationError` at once; its
    /// memory stays held (and its unique reserved) until the device answers it late; a
    /// request made meanwhile gets its own answer, not the late one.
    @Test(.timeLimit(.minutes(5))) func cancelledReadReturnsAtOnceAndItsLateAnswerIsNobodyElses() async throws {
        let hold = HoldSwitch()
        let h = try FSDeviceHarness(hold: hold)
        defer { h.shutdown() }
        let fs = try h.connect(requestTimeout: 60)
        defer { fs.close() }
        let a = pattern(4096, seed: 11)
        let b = pattern(4096, seed: 12)
        try await fs.writeFile("a", bytes: a)
        try await fs.writeFile("b", bytes: b)
        let ea = try await fs.lookup(parent: FuseProtocol.rootNodeID, name: "a")
        let eb = try await fs.lookup(parent: FuseProtocol.rootNodeID, name: "b")
        let ha = try await fs.open(ea.nodeID)
        let hb = try await fs.open(eb.nodeID)
        hold.hold()
        let cancelled = Task { try await fs.read(ha, at: 0, count: 4096) }
        #expect(try await eventually { hold.chainsHeld == 1 })  // the device has it
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        #expect(fs.asyncHeld == 1)  // its memory stays the request's while the device has it
        async let second = fs.read(hb, at: 0, count: 4096)
        #expect(try await eventually { hold.chainsHeld == 2 })
        hold.release()  // the cancelled request is answered first, late
        #expect(try await second == b)
        #expect(try await eventually { fs.asyncHeld == 0 })
        #expect(!fs.isBroken)
        #expect(try await fs.read(ha, at: 0, count: 4096) == a)
    }

    /// A task cancelled before its call posts nothing: the device never sees it.
    @Test(.timeLimit(.minutes(5))) func alreadyCancelledCallPostsNothing() async throws {
        let hold = HoldSwitch()
        let h = try FSDeviceHarness(hold: hold)
        defer { h.shutdown() }
        let fs = try h.connect(requestTimeout: 60)
        defer { fs.close() }
        hold.hold()
        let t = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await fs.stat("/")
        }
        await #expect(throws: CancellationError.self) { try await t.value }
        try await Task.sleep(for: .milliseconds(50))
        #expect(hold.chainsHeld == 0)
        #expect(fs.asyncHeld == 0)
        hold.release()
        #expect(try await fs.stat("/").type == .directory)
    }

    /// A request the device never answers fails the driver by its deadline (R5); the
    /// cancelled caller was resumed long before, and the memory is released then.
    @Test(.timeLimit(.minutes(5))) func unansweredRequestBreaksTheDriverByItsDeadline() async throws {
        let hold = HoldSwitch()
        let h = try FSDeviceHarness(hold: hold)
        defer { h.shutdown() }
        let fs = try h.connect(requestTimeout: 1)
        defer { fs.close() }
        hold.hold()
        let cancelled = Task { try await fs.stat("/") }
        #expect(try await eventually { hold.chainsHeld == 1 })
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        await #expect(throws: FSError.timeout(milliseconds: 1000)) { try await fs.stat("/") }
        #expect(fs.isBroken)
        #expect(try await eventually { fs.asyncHeld == 0 })
        await #expect(throws: FSError.timeout(milliseconds: 1000)) { try await fs.stat("/") }
        hold.release()
    }
}
