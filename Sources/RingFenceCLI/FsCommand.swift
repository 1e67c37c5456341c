import ArgumentParser
import Foundation
import RingFenceResults
import VirtioFS

/// `ringfence fs`: a thin shell over `VirtioFS.VirtioFSDriver`.
/// Exit 0 ok, 1 device or violation error (one line naming the rule), 2 usage.
struct Fs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fs",
        abstract: "Use a vhost-user-fs back-end (virtiofsd, serve-fs) with the hardened virtio-fs driver.",
        discussion: helpDiscussion(
            "The back-end is virtiofsd, `ringfence serve-fs` or any vhost-user-fs device. Paths are in the shared directory; sizes in bytes (4k, 16M). Exit 0 ok, 1 on a device or file error or a broken rule (one line naming it), 2 on a usage error.",
            examples: "ringfence serve-fs --socket fs.sock --dir /srv/share &", "ringfence fs --socket fs.sock ls -l /",
            "ringfence fs --socket fs.sock put local.bin /remote.bin"),
        subcommands: [
            FsLs.self, FsStat.self, FsCat.self, FsGet.self, FsPut.self, FsMkdir.self, FsRm.self, FsMv.self,
            FsTree.self, FsBenchCommand.self,
        ])

    @Option(help: "Path of the back-end's vhost-user socket.")
    var socket: String

    @Option(help: "Request queues to use (clamped to what the device offers).")
    var queues: Int = 1

    @Option(help: "Deadline in seconds for connecting and for each request.")
    var timeout: Double = 10

    @Option(help: "Tag to report when the back-end serves no config space.")
    var tag = "ringfence"

    func validate() throws {
        guard queues >= 1, queues <= 64 else { throw ValidationError("--queues must be 1...64") }
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be in (0, 3600]") }
    }

    func open() throws -> VirtioFSDriver {
        var options = VirtioFSDriver.Options()
        options.queues = queues
        options.requestTimeout = timeout
        options.controlTimeout = timeout
        options.tag = tag
        return try fsOrExit { () throws(FSError) in try VirtioFSDriver.connect(socket: socket, options: options) }
    }
}

/// Runs a file-system operation; an `FSError` becomes one line on stderr and exit 1.
func fsOrExit<T>(_ body: () throws(FSError) -> T) throws -> T {
    do {
        return try body()
    } catch {
        FileHandle.standardError.write(Data("ringfence fs: error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

func describe(_ t: FuseProtocol.FileType) -> String {
    switch t {
    case .regular: return "file"
    case .directory: return "directory"
    case .symlink: return "symlink"
    case .fifo: return "fifo"
    case .socket: return "socket"
    case .characterDevice: return "character device"
    case .blockDevice: return "block device"
    }
}

func typeLetter(_ t: FuseProtocol.FileType) -> String {
    switch t {
    case .regular: return "-"
    case .directory: return "d"
    case .symlink: return "l"
    case .fifo: return "p"
    case .socket: return "s"
    case .characterDevice: return "c"
    case .blockDevice: return "b"
    }
}

func permissionString(_ p: UInt32) -> String {
    let chars = Array("rwxrwxrwx")
    return String((0..<9).map { i in p & (1 << (8 - i)) != 0 ? chars[i] : "-" })
}

/// Progress on stderr, at most every 64 MiB or at the end.
/// Progress of a large get/put (each 64 MiB), on a terminal only, as every progress line.
final class FsProgress {
    let line = ProgressLine(json: false)
    let total: Int
    let label: String
    var last = 0
    init(total: Int, label: String) {
        self.total = total
        self.label = label
    }
    func update(_ done: Int) {
        guard line.enabled, done - last >= 64 << 20 || done == total else { return }
        last = done
        let percent = total > 0 ? done * 100 / total : 100
        FileHandle.standardError.write(Data("\(label): \(done >> 20) MiB of \(total >> 20) MiB (\(percent)%)\n".utf8))
    }
}

struct FsLs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls", abstract: "List a directory.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock ls", "ringfence fs --socket fs.sock ls -l /dir"))
    @ParentCommand var fs: Fs
    @Argument var path = "/"
    @Flag(name: .shortAndLong, help: "Type, permissions and size too.") var long = false

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        let entries = try fsOrExit { () throws(FSError) in try d.listDirectory(path) }.sorted { $0.name < $1.name }
        for e in entries {
            let a = e.entry.attributes
            if long {
                print("\(typeLetter(a.type))\(permissionString(a.permissions)) \(a.size)\t\(e.name)")
            } else {
                print(e.name)
            }
        }
    }
}

struct FsStat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stat", abstract: "Show a file's attributes.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock stat /file", "ringfence fs --socket fs.sock stat /dir"))
    @ParentCommand var fs: Fs
    @Argument var path: String

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        let a = try fsOrExit { () throws(FSError) in try d.stat(path) }
        print("type:        \(describe(a.type))")
        print("size:        \(a.size)")
        print("permissions: 0\(String(a.permissions, radix: 8)) (\(permissionString(a.permissions)))")
        print("links:       \(a.links)")
        print("owner:       \(a.uid):\(a.gid)")
        print("inode:       \(a.inodeNumber) (nodeid \(a.nodeID))")
        print("modified:    \(a.modificationTime.seconds).\(a.modificationTime.nanoseconds)")
    }
}

struct FsCat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cat", abstract: "Print a file to stdout.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock cat /etc/hostname",
            "ringfence fs --socket fs.sock cat /file > local.bin"))
    @ParentCommand var fs: Fs
    @Argument var path: String

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        let bytes = try fsOrExit { () throws(FSError) in try d.readFile(path) }
        FileHandle.standardOutput.write(Data(bytes))
    }
}

struct FsGet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "get", abstract: "Copy a file to the local disk.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock get /remote.bin local.bin",
            "ringfence fs --socket fs.sock get /dir/file copy"))
    @ParentCommand var fs: Fs
    @Argument(help: "Path in the shared directory.") var remote: String
    @Argument(help: "Local file to write.") var local: String

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        let size = try fsOrExit { () throws(FSError) in try d.stat(remote) }.size
        let progress = FsProgress(total: Int(size), label: "get \(remote)")
        let bytes = try fsOrExit { () throws(FSError) in try d.readFile(remote) { progress.update($0) } }
        guard FileManager.default.createFile(atPath: local, contents: Data(bytes)) else {
            FileHandle.standardError.write(Data("ringfence fs: cannot write \(local)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct FsPut: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "put", abstract: "Copy a local file in.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock put local.bin /remote.bin",
            "ringfence fs --socket fs.sock put notes.txt /dir/notes.txt"))
    @ParentCommand var fs: Fs
    @Argument(help: "Local file to read.") var local: String
    @Argument(help: "Path in the shared directory.") var remote: String

    func run() throws {
        guard let data = FileManager.default.contents(atPath: local) else {
            FileHandle.standardError.write(Data("ringfence fs: cannot read \(local)\n".utf8))
            throw ExitCode(1)
        }
        let d = try fs.open()
        defer { d.close() }
        let progress = FsProgress(total: data.count, label: "put \(remote)")
        try fsOrExit { () throws(FSError) in try d.writeFile(remote, bytes: Array(data)) { progress.update($0) } }
    }
}

struct FsMkdir: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mkdir", abstract: "Create a directory.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock mkdir /dir", "ringfence fs --socket fs.sock mkdir /dir/sub"))
    @ParentCommand var fs: Fs
    @Argument var path: String

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        try fsOrExit { () throws(FSError) in try d.makeDirectory(path) }
    }
}

struct FsRm: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rm", abstract: "Remove a file, symlink or empty directory.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock rm /remote.bin", "ringfence fs --socket fs.sock rm /dir/sub"))
    @ParentCommand var fs: Fs
    @Argument var path: String

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        try fsOrExit { () throws(FSError) in try d.remove(path) }
    }
}

struct FsMv: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mv", abstract: "Rename (RENAME2).",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock mv /a /b",
            "ringfence fs --socket fs.sock mv --no-replace /a /b"))
    @ParentCommand var fs: Fs
    @Argument var from: String
    @Argument var to: String
    @Flag(name: .customLong("no-replace"), help: "Fail if the target exists.") var noReplace = false

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        try fsOrExit { () throws(FSError) in
            try d.rename(from, to: to, flags: noReplace ? FuseProtocol.RenameFlag.noReplace : 0)
        }
    }
}

struct FsTree: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tree", abstract: "List a directory recursively.",
        discussion: helpDiscussion(
            "", examples: "ringfence fs --socket fs.sock tree", "ringfence fs --socket fs.sock tree --depth 2 /dir"))
    @ParentCommand var fs: Fs
    @Argument var path = "/"
    @Option(help: "Deepest level shown.") var depth = 16

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        print(path)
        try walk(d, path, prefix: "", level: 1)
    }

    func walk(_ d: VirtioFSDriver, _ dir: String, prefix: String, level: Int) throws {
        guard level <= depth else { return }
        let entries = try fsOrExit { () throws(FSError) in try d.listDirectory(dir) }.sorted { $0.name < $1.name }
        for (i, e) in entries.enumerated() {
            let last = i == entries.count - 1
            print("\(prefix)\(last ? "└── " : "├── ")\(e.name)\(e.entry.attributes.type == .directory ? "/" : "")")
            if e.entry.attributes.type == .directory {
                try walk(
                    d, dir == "/" ? e.name : "\(dir)/\(e.name)", prefix: prefix + (last ? "    " : "│   "),
                    level: level + 1)
            }
        }
    }
}

struct FsBenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "stat and lookup ops/s, 4 KiB random reads, 1 MiB sequential reads of one file.",
        discussion: helpDiscussion(
            "The file is made with --size bytes when missing; each measurement runs --runtime seconds.",
            examples: "ringfence fs --socket fs.sock bench",
            "ringfence fs --socket fs.sock bench --size 16M --runtime 5 --json"))
    @ParentCommand var fs: Fs
    @Option(help: "File to read (created with --size bytes when missing).") var file = "ringfence-bench.bin"
    @Option(help: "Size of the file when it is created.") var size: Size = Size(64 << 20)
    @Option(help: "Seconds per measurement.") var runtime: Double = 2
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        guard runtime > 0, runtime <= 600 else { throw ValidationError("--runtime must be in (0, 600]") }
        guard size.bytes >= 1 << 20, size.bytes <= 1 << 32 else { throw ValidationError("--size must be 1M...4G") }
    }

    func run() throws {
        let d = try fs.open()
        defer { d.close() }
        let progress = ProgressLine(json: json)
        defer { progress.clear() }
        let r = try fsOrExit { () throws(FSError) in
            try FSBench.run(d, path: file, fileSize: size.bytes, seconds: runtime) { step in
                progress.show("bench: \(step)")
            }
        }
        if json {
            printJSON(
                FsBenchResult(
                    statOps: r.statPerSecond, lookupOps: r.lookupPerSecond, randread4kOps: r.randomRead4KPerSecond,
                    seqread1mMibS: r.sequentialReadMiBPerSecond, seconds: runtime))
        } else {
            print("stat:              \(format(r.statPerSecond, 0)) ops/s")
            print("lookup+forget:     \(format(r.lookupPerSecond, 0)) ops/s")
            print("4 KiB random read: \(format(r.randomRead4KPerSecond, 0)) ops/s")
            print("1 MiB seq read:    \(format(r.sequentialReadMiBPerSecond, 1)) MiB/s")
        }
    }
}
