import Foundation
import Testing

@testable import VirtioFS

/// A malicious driver against the device: names, nodeids and sizes chosen to escape the
/// directory or exhaust the device. Each attempt fails with an exact errno, nothing
/// outside the directory is touched, and the device goes on serving.
@Suite(.serialized)
struct MaliciousDriverTests {
    @Test func dotDotAndSlashNamesAreRefused() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        let fs = try h.connect()
        defer { fs.close() }
        for name in ["..", ".", "../outside", "a/b", "/etc", ""] {
            #expect(throws: FSError.errno(EINVAL), "\(name)") { try fs.rawLookup(1, Array(name.utf8)) }
        }
        #expect(throws: FSError.errno(ENAMETOOLONG)) { try fs.rawLookup(1, Array(repeating: 0x61, count: 256)) }
        #expect(!fs.isBroken)
    }

    @Test func symlinkPointingOutsideIsNeverFollowed() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        try FileManager.default.createSymbolicLink(atPath: "\(h.root)/esc", withDestinationPath: h.outside)
        try FileManager.default.createSymbolicLink(atPath: "\(h.root)/up", withDestinationPath: "../outside/secret")
        let fs = try h.connect()
        defer { fs.close() }
        let esc = try fs.rawLookup(1, Array("esc".utf8))
        #expect(try fs.getAttributes(esc).type == .symlink)
        // Looking up beneath a symlink: it is not a directory to us.
        #expect(throws: FSError.errno(ENOTDIR)) { try fs.rawLookup(esc, Array("secret".utf8)) }
        #expect(throws: FSError.errno(ENOTDIR)) {
            try fs.raw(.mkdir, node: esc, args: [0xed, 0x41, 0, 0, 0, 0, 0, 0] + Array("x".utf8) + [0])
        }
        // Opening a symlink: refused, not followed.
        let up = try fs.rawLookup(1, Array("up".utf8))
        #expect(throws: FSError.errno(ELOOP)) { try fs.open(up) }
        // Creating over a symlink without O_EXCL: the name is not followed either.
        var create = FuseWriter()
        create.put(UInt32(O_RDWR | O_CREAT))
        create.put(UInt32(0o100644))
        create.put(UInt32(0))
        create.put(UInt32(0))
        create.append(Array("up".utf8) + [0])
        #expect(throws: FSError.errno(ELOOP)) { try fs.raw(.create, node: 1, args: create.bytes, replyLimit: 144) }
        #expect(try String(contentsOfFile: "\(h.outside)/secret", encoding: .utf8) == "secret")
        #expect(!fs.isBroken)
    }

    /// One request buffer and one reply buffer are reused from request to request: a
    /// reply that does not fit the room posted is ERANGE (the header alone), and requests
    /// of every size, in any order, get exactly their own reply (nothing carried over).
    @Test func repliesThatDoNotFitAreERangeAndReusedBuffersCarryNothingOver() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        let long = String(repeating: "n", count: 255)
        try Data("abc".utf8).write(to: URL(fileURLWithPath: "\(h.root)/\(long)"))
        let fs = try h.connect()
        defer { fs.close() }
        let getattrIn = [UInt8](repeating: 0, count: 16)
        #expect(throws: FSError.errno(ERANGE)) {
            try fs.raw(.getattr, node: 1, args: getattrIn, replyLimit: FuseProtocol.attrOutSize - 1)
        }
        for _ in 0..<3 {
            let node = try fs.rawLookup(1, Array(long.utf8))
            #expect(try fs.getAttributes(node).size == 3)
            #expect(try fs.raw(.getattr, node: node, args: getattrIn).count == FuseProtocol.attrOutSize)
            #expect(throws: FSError.errno(ENOENT)) { try fs.rawLookup(1, Array("x".utf8)) }
            #expect(try fs.statistics().blockSize > 0)
            try fs.forget(node)
        }
        #expect(!fs.isBroken)
    }

    @Test func renameOutOfTheDirectoryIsRefused() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        try Data("in".utf8).write(to: URL(fileURLWithPath: "\(h.root)/f"))
        let fs = try h.connect()
        defer { fs.close() }
        var w = FuseWriter()
        w.put(UInt64(1))
        w.put(UInt32(0))
        w.put(UInt32(0))
        w.append(Array("f".utf8) + [0] + Array("../outside/f".utf8) + [0])
        #expect(throws: FSError.errno(EINVAL)) { try fs.raw(.rename2, node: 1, args: w.bytes, replyLimit: 0) }
        var whiteout = FuseWriter()
        whiteout.put(UInt64(1))
        whiteout.put(UInt32(4))  // RENAME_WHITEOUT
        whiteout.put(UInt32(0))
        whiteout.append(Array("f".utf8) + [0] + Array("g".utf8) + [0])
        #expect(throws: FSError.errno(EINVAL)) { try fs.raw(.rename2, node: 1, args: whiteout.bytes, replyLimit: 0) }
        #expect(!FileManager.default.fileExists(atPath: "\(h.outside)/f"))
        #expect(FileManager.default.fileExists(atPath: "\(h.root)/f"))
    }

    @Test func unknownAndForgottenNodeIDsAreStale() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        try Data("x".utf8).write(to: URL(fileURLWithPath: "\(h.root)/f"))
        let fs = try h.connect()
        defer { fs.close() }
        #expect(throws: FSError.errno(ESTALE)) {
            try fs.raw(.getattr, node: 999, args: [UInt8](repeating: 0, count: 16))
        }
        #expect(throws: FSError.errno(ESTALE)) { try fs.raw(.getattr, node: 0, args: [UInt8](repeating: 0, count: 16)) }
        let f = try fs.rawLookup(1, Array("f".utf8))
        try fs.forget(f)
        try fs.flushForgets()
        #expect(throws: FSError.errno(ESTALE)) { try fs.raw(.getattr, node: f, args: [UInt8](repeating: 0, count: 16)) }
        // A file handle that was never opened.
        var read = FuseWriter()
        read.put(UInt64(12345))
        read.put(UInt64(0))
        read.put(UInt32(10))
        read.zeros(20)
        #expect(throws: FSError.errno(EBADF)) { try fs.raw(.read, node: 1, args: read.bytes) }
    }

    @Test func aDriverThatNeverForgetsHitsTheInodeBound() throws {
        let h = try FSDeviceHarness(maximumInodes: 32)
        defer { h.shutdown() }
        for i in 0..<40 { _ = FileManager.default.createFile(atPath: "\(h.root)/f\(i)", contents: Data()) }
        let fs = try h.connect()
        defer { fs.close() }
        var held: [UInt64] = []
        for i in 0..<31 { held.append(try fs.rawLookup(1, Array("f\(i)".utf8))) }
        #expect(throws: FSError.errno(ENFILE)) { try fs.rawLookup(1, Array("f31".utf8)) }
        // The same inode again costs no slot.
        #expect(try fs.rawLookup(1, Array("f0".utf8)) == held[0])
        #expect(h.device.held.inodes == 32)
        try fs.forget(held[5])
        try fs.flushForgets()
        _ = try fs.rawLookup(1, Array("f31".utf8))
        #expect(h.device.held.inodes == 32)
    }

    @Test func openHandlesAreBounded() throws {
        let h = try FSDeviceHarness(maximumHandles: 4)
        defer { h.shutdown() }
        _ = FileManager.default.createFile(atPath: "\(h.root)/f", contents: Data())
        let fs = try h.connect()
        defer { fs.close() }
        let f = try fs.rawLookup(1, Array("f".utf8))
        for _ in 0..<4 { _ = try fs.open(f) }
        #expect(throws: FSError.errno(ENFILE)) { try fs.open(f) }
    }

    @Test func requestsWithLyingLengthsFail() throws {
        let h = try FSDeviceHarness()
        defer { h.shutdown() }
        let fs = try h.connect()
        defer { fs.close() }
        // WRITE claiming more data than the request carries.
        _ = FileManager.default.createFile(atPath: "\(h.root)/f", contents: Data())
        let f = try fs.rawLookup(1, Array("f".utf8))
        let handle = try fs.open(f, flags: O_RDWR)
        var w = FuseWriter()
        w.put(handle.fh)
        w.put(UInt64(0))
        w.put(UInt32(1 << 20))
        w.zeros(20)
        #expect(throws: FSError.errno(EINVAL)) {
            try fs.raw(.write, node: f, args: w.bytes + [1, 2, 3], replyLimit: 8)
        }
        // SETATTR with a truncated argument.
        #expect(throws: FSError.errno(EINVAL)) { try fs.raw(.setattr, node: f, args: [1, 2, 3]) }
        // Unknown opcode.
        #expect(throws: FSError.errno(ENOSYS)) { try fs.raw(.getlk, node: f, args: []) }
        // A write at an offset that would overflow.
        var o = FuseWriter()
        o.put(handle.fh)
        o.put(UInt64(Int64.max))
        o.put(UInt32(3))
        o.zeros(20)
        #expect(throws: FSError.errno(EINVAL)) {
            try fs.raw(.write, node: f, args: o.bytes + [1, 2, 3], replyLimit: 8)
        }
        #expect((try FileManager.default.attributesOfItem(atPath: "\(h.root)/f")[.size] as? Int) == 0)
        #expect(!fs.isBroken)
        // What serve-fs --metrics shows: four failed requests, the two lying WRITEs under R3.
        let s = h.device.statistics
        #expect(s.failed == 4, "\(s)")
        #expect(s.violations == ["R3": 2], "\(s)")
        #expect(s.requests[.write] == 2 && s.bytesWritten == 0, "\(s)")
        #expect(s.requests[.session] == 1, "one INIT")
    }
}
