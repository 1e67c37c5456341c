import Foundation
import Testing
import VirtioFS

/// Our virtio-fs driver against Debian's virtiofsd: files written through the driver are
/// checked on the host, and the reverse.
@Suite(
    "virtiofsd (real vhost-user-fs peer)", .serialized,
    .enabled(if: Virtiofsd.installed, "virtiofsd is not installed (Debian qemu-system-common) or not root"))
struct VirtiofsdTests {
    func open(_ d: Virtiofsd) throws -> VirtioFSDriver {
        var o = VirtioFSDriver.Options()
        o.requestTimeout = 10
        return try VirtioFSDriver.connect(socket: d.socket, options: o)
    }

    @Test func initNegotiates() throws {
        let d = try Virtiofsd()
        let fs = try open(d)
        defer { fs.close() }
        #expect(fs.info.requestQueues >= 1)
        #expect(fs.info.maxWrite >= 4096)
        let root = try fs.stat("/")
        #expect(root.type == .directory)
    }

    @Test func fileWrittenThroughTheDriverIsOnTheHost() throws {
        let d = try Virtiofsd()
        let fs = try open(d)
        defer { fs.close() }
        let data = pattern(3 << 20, seed: 42)
        try fs.makeDirectory("dir")
        try fs.writeFile("dir/file.bin", bytes: data)
        #expect(FileManager.default.contents(atPath: "\(d.shared)/dir/file.bin") == Data(data))
        #expect(try fs.stat("dir/file.bin").size == Int64(data.count))
        #expect(try fs.readFile("dir/file.bin") == data)
    }

    @Test func fileWrittenOnTheHostReadsThroughTheDriver() throws {
        let d = try Virtiofsd()
        let data = pattern(100_000, seed: 7)
        try FileManager.default.createDirectory(atPath: "\(d.shared)/a/b", withIntermediateDirectories: true)
        try Data(data).write(to: URL(fileURLWithPath: "\(d.shared)/a/b/host.bin"))
        try FileManager.default.createSymbolicLink(atPath: "\(d.shared)/a/link", withDestinationPath: "b/host.bin")
        let fs = try open(d)
        defer { fs.close() }
        #expect(try fs.readFile("a/b/host.bin") == data)
        #expect(try fs.readLink("a/link") == "b/host.bin")
        #expect(try fs.stat("a/link").type == .symlink)
        let names = try fs.listDirectory("a").map(\.name).sorted()
        #expect(names == ["b", "link"])
    }

    @Test func namespaceOperationsShowOnTheHost() throws {
        let d = try Virtiofsd()
        let fs = try open(d)
        defer { fs.close() }
        try fs.writeFile("one", bytes: Array("1".utf8))
        try fs.rename("one", to: "two")
        #expect(!FileManager.default.fileExists(atPath: "\(d.shared)/one"))
        #expect(FileManager.default.contents(atPath: "\(d.shared)/two") == Data("1".utf8))
        try fs.symlink("sym", target: "two")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "\(d.shared)/sym") == "two")
        try fs.makeDirectory("d")
        try fs.remove("d")
        try fs.remove("sym")
        try fs.remove("two")
        #expect(try FileManager.default.contentsOfDirectory(atPath: d.shared).isEmpty)
        #expect(throws: FSError.errno(ENOENT)) { try fs.stat("two") }
        #expect(!fs.isBroken)
    }

    @Test func manyEntriesListAcrossSeveralReplies() throws {
        let d = try Virtiofsd()
        for i in 0..<500 {
            _ = FileManager.default.createFile(atPath: "\(d.shared)/file-with-a-longish-name-\(i)", contents: Data([1]))
        }
        let fs = try open(d)
        defer { fs.close() }
        let listed = try fs.listDirectory("/")
        #expect(listed.count == 500)
        #expect(Set(listed.map(\.name)).count == 500)
        #expect(listed.allSatisfy { $0.entry.attributes.size == 1 })
        // Every lookup reference taken went back in BATCH_FORGETs; the driver is healthy.
        #expect(!fs.isBroken)
    }

    @Test func setattrTruncatesAndChmods() throws {
        let d = try Virtiofsd()
        let fs = try open(d)
        defer { fs.close() }
        try fs.writeFile("f", bytes: pattern(10_000, seed: 1))
        let a = try fs.withNode("f") { (e) throws(FSError) in
            try fs.setAttributes(e!.nodeID, .init(size: 100, permissions: 0o600))
        }
        #expect(a.size == 100)
        #expect(a.permissions == 0o600)
        let st = try FileManager.default.attributesOfItem(atPath: "\(d.shared)/f")
        #expect((st[.size] as? Int) == 100)
        #expect((st[.posixPermissions] as? Int) == 0o600)
        let s = try fs.statistics()
        #expect(s.blockSize > 0)
    }
}
