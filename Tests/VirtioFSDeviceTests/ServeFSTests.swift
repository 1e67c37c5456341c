import Dispatch
import Foundation
import Synchronization
import Testing
import VirtioFS

/// Our driver against our device (`serve-fs`'s code): what a user does, checked on the host.
@Suite(.serialized)
struct ServeFSTests {
    @Test func configAndInitNegotiate() throws {
        let h = try FSDeviceHarness(queues: 2)
        defer { h.shutdown() }
        let fs = try h.connect(queues: 2)
        defer { fs.close() }
        #expect(fs.info.tag == "testfs")
        #expect(fs.info.requestQueues == 2)
        #expect(fs.info.maxWrite == 1 << 20)
        #expect(try fs.stat("/").type == .directory)
    }

    @Test func filesRoundTripAndShowOnTheHost() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        let fs = try h.connect()
        defer { fs.close() }
        let data = pattern(5 << 20 + 123, seed: 9)
        try fs.makeDirectory("d")
        try fs.writeFile("d/f", bytes: data)
        #expect(FileManager.default.contents(atPath: "\(h.root)/d/f") == Data(data))
        #expect(try fs.readFile("d/f") == data)
        try Data("host".utf8).write(to: URL(fileURLWithPath: "\(h.root)/d/h"))
        #expect(try fs.readFile("d/h") == Array("host".utf8))
        #expect(try fs.listDirectory("d").map(\.name).sorted() == ["f", "h"])
        try fs.rename("d/h", to: "h2")
        #expect(FileManager.default.fileExists(atPath: "\(h.root)/h2"))
        try fs.symlink("l", target: "d/f")
        #expect(try fs.readLink("l") == "d/f")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(h.root)/l") == "d/f")
        #expect(throws: FSError.errno(ENOTEMPTY)) { try fs.remove("d") }
        try fs.remove("d/f")
        try fs.remove("d")
        try fs.remove("l")
        try fs.remove("h2")
        #expect(try FileManager.default.contentsOfDirectory(atPath: h.root).isEmpty)
        #expect(!fs.isBroken)
    }

    @Test func setattrAndStatfs() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        let fs = try h.connect()
        defer { fs.close() }
        try fs.writeFile("f", bytes: pattern(10_000, seed: 2))
        let a = try fs.withNode("f") { (e) throws(FSError) in
            try fs.setAttributes(e!.nodeID, .init(size: 10, permissions: 0o600))
        }
        #expect(a.size == 10)
        #expect(a.permissions == 0o600)
        let st = try FileManager.default.attributesOfItem(atPath: "\(h.root)/f")
        #expect((st[.size] as? Int) == 10)
        #expect(try fs.statistics().blockSize > 0)
    }

    @Test func largeDirectoryListsCompletelyAndEveryInodeIsForgotten() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        for i in 0..<700 { _ = FileManager.default.createFile(atPath: "\(h.root)/entry-\(i)", contents: Data()) }
        let fs = try h.connect()
        defer { fs.close() }
        let names = try fs.listDirectory("/").map(\.name)
        #expect(names.count == 700)
        #expect(Set(names).count == 700)
        try fs.flushForgets()
        // Only the root stays: READDIRPLUS lookups were all forgotten (BATCH_FORGET).
        #expect(h.device.held.inodes == 1)
        #expect(h.device.held.handles == 0)
    }

    @Test func readOnlyRefusesChanges() throws {
        let h = try FSDeviceHarness(readOnly: true)
        defer { h.shutdown() }
        try Data("x".utf8).write(to: URL(fileURLWithPath: "\(h.root)/f"))
        let fs = try h.connect()
        defer { fs.close() }
        #expect(try fs.readFile("f") == Array("x".utf8))
        #expect(throws: FSError.errno(EROFS)) { try fs.writeFile("g", bytes: [1]) }
        #expect(throws: FSError.errno(EROFS)) { try fs.makeDirectory("d") }
        #expect(throws: FSError.errno(EROFS)) { try fs.remove("f") }
        #expect(throws: FSError.errno(EROFS)) {
            try fs.withNode("f") { (e) throws(FSError) in _ = try fs.open(e!.nodeID, flags: O_RDWR) }
        }
    }

    /// `read(_:at:into:)` (the benchmark's read): 1 MiB chunks land in the caller's buffer
    /// with the host's bytes, the last one short, past the end 0; a buffer above
    /// `info.maxRead` is refused before anything is sent.
    @Test func readIntoABufferMatchesTheHostFile() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        let data = pattern(2 << 20 + 4321, seed: 5)
        try Data(data).write(to: URL(fileURLWithPath: "\(h.root)/big"))
        let fs = try h.connect()
        defer { fs.close() }
        #expect(fs.info.maxRead == 1 << 20)
        let handle = try fs.withNode("big") { (e) throws(FSError) in try fs.open(e!.nodeID) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var got: [UInt8] = []
        var counts: [Int] = []
        var shortTailUntouched = false
        while true {
            buffer.initializeMemory(as: UInt8.self, repeating: 0xee)
            let n = try fs.read(handle, at: UInt64(got.count), into: buffer)
            counts.append(n)
            if n > 0 && n < buffer.count { shortTailUntouched = buffer[n] == 0xee }
            if n == 0 { break }
            got += buffer[0..<n]
        }
        #expect(counts == [1 << 20, 1 << 20, 4321, 0])
        #expect(got == data)
        // Nothing past the count of a short read is written.
        #expect(shortTailUntouched)
        let tooBig = UnsafeMutableRawBufferPointer.allocate(byteCount: (1 << 20) + 1, alignment: 8)
        defer { tooBig.deallocate() }
        #expect(throws: FSError.invalidRequest("read of \((1 << 20) + 1) bytes exceeds \(1 << 20)")) {
            _ = try fs.read(handle, at: 0, into: tooBig)
        }
        try fs.release(handle)
        #expect(!fs.isBroken)
    }

    @Test func reconnectingDriverFindsAFreshSession() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        do {
            let fs = try h.connect()
            _ = try fs.lookup(parent: 1, name: "..x") as FSEntry?
            fs.close()
        } catch FSError.errno(ENOENT) {}
        let fs = try h.connect()
        defer { fs.close() }
        try fs.writeFile("again", bytes: [1, 2, 3])
        #expect(try fs.readFile("again") == [1, 2, 3])
    }
}

/// The driver's calls are thread-safe: threads share it, requests spread over the queues.
@Suite(.serialized)
struct ConcurrentDriverTests {
    @Test func threadsShareTheDriverAcrossTwoRequestQueues() throws {
        let h = try FSDeviceHarness(queues: 2)
        defer { h.shutdown() }
        let fs = try h.connect(queues: 2)
        defer { fs.close() }
        #expect(fs.info.requestQueues == 2)
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            let data = pattern(300_000 + t, seed: UInt64(t + 1))
            do throws(FSError) {
                for round in 0..<5 {
                    try fs.writeFile("t\(t)-\(round)", bytes: data)
                    guard try fs.readFile("t\(t)-\(round)") == data else {
                        failures.withLock { $0.append("thread \(t) round \(round): data differs") }
                        return
                    }
                    _ = try fs.listDirectory("/")
                }
            } catch {
                failures.withLock { $0.append("thread \(t): \(error)") }
            }
        }
        #expect(failures.withLock { $0 } == [])
        #expect(!fs.isBroken)
        #expect(try FileManager.default.contentsOfDirectory(atPath: h.root).count == 20)
        try fs.flushForgets()
        #expect(h.device.held.inodes == 1)
    }
}
