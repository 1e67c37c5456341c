import Adversary
import ArgumentParser
import BlockBench
import BlockImage
import Foundation
import RingFenceResults
import SharedMemory
import VerifiedBlock
import VirtioBlock
import XenRing

#if canImport(Glibc)
import Glibc
#endif

/// `ringfence serve-xen-blk`: the hardened blkif backend over a disk image (or memory),
/// one frontend at a time; a frontend that corrupts the ring is dropped and the next served.
struct ServeXenBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve-xen-blk",
        abstract: "Serve a disk image to Xen-style blkif frontends over an emulated PV ring.",
        discussion: helpDiscussion(
            "Listens on a Unix socket; each connection runs the xenstore-like handshake, maps the frontend's grant table and frames (sealed memfds), and serves blkif requests until the frontend closes. --attack makes this backend misbehave (for audits).",
            examples: "ringfence serve-xen-blk --socket x.sock --image disk.img",
            "ringfence serve-xen-blk --socket x.sock --image disk.img --connections 1"))

    @Option(help: "Unix socket path to listen on.")
    var socket: String?

    @Option(help: "Disk image (its size, in 512-byte sectors, is the capacity).")
    var image: String?

    @Option(help: "Misbehave: \(XenBackendAttack.allCases.map(\.rawValue).joined(separator: ", ")).")
    var attack: String?

    @Option(help: "Stop after this many connections (0 = serve forever).")
    var connections: Int = 0

    @Option(help: ArgumentHelp("Serve one connection on this inherited socket descriptor.", visibility: .hidden))
    var fd: Int32?

    @Option(help: ArgumentHelp("Serve an in-memory disk of this many sectors.", visibility: .hidden))
    var memorySectors: Int?

    @OptionGroup var wait: WaitOptions

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics at ADDR: a Unix socket path or 127.0.0.1:PORT (SIGUSR1 logs them too).",
            valueName: "addr"))
    var metrics: String?

    func validate() throws {
        guard (socket == nil) != (fd == nil) else { throw ValidationError("give exactly one of --socket or --fd") }
        if let metrics { _ = try MetricsAddress(parsing: metrics) }
        guard (image == nil) != (memorySectors == nil) else { throw ValidationError("give --image FILE") }
        if let attack, XenBackendAttack(rawValue: attack) == nil { throw ValidationError("unknown attack \(attack)") }
    }

    func run() throws { try orExitServing("serve-xen-blk") { try serve() } }

    private func serve() throws {
        let storage: any BlockStorage
        if let image {
            let file = try DeviceImage(path: image)
            guard file.size >= 512 else { throw ImageTooSmall(path: image) }
            storage = file
        } else {
            storage = MemoryStorage(sectors: memorySectors ?? 0)
        }
        let attack = self.attack.flatMap(XenBackendAttack.init(rawValue:))
        // SIGUSR1 (blocked before any thread exists) logs the metrics; INT and TERM keep
        // their default action.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGUSR1)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let serverMetrics = ServerMetrics(server: "serve-xen-blk")
        let endpoint = try metrics.map { try MetricsEndpoint(try MetricsAddress(parsing: $0), metrics: serverMetrics) }
        defer { endpoint?.removeSocket() }
        let dumpMetrics: @Sendable () -> Void = {
            FileHandle.standardError.write(Data("serve-xen-blk: metrics (SIGUSR1):\n\(serverMetrics.text)".utf8))
        }
        try startSignalWaiter(signals, onDump: dumpMetrics) { _ in }
        if let fd {
            serveOne(UnixChannel(adopting: fd), storage: storage, attack: attack, metrics: serverMetrics, number: 1)
            return
        }
        let listener = try UnixListener(path: socket ?? "")
        print(
            "serve-xen-blk: \(storage.sectorCount) sectors on \(socket ?? "")\(attack.map { " (attack \($0.rawValue))" } ?? "")"
        )
        if let endpoint { FileHandle.standardError.write(Data("serve-xen-blk: metrics on \(endpoint.bound)\n".utf8)) }
        var served = 0
        while connections == 0 || served < connections {
            guard let channel = try? listener.accept(until: .after(seconds: 3600)) else { continue }
            served += 1
            serveOne(channel, storage: storage, attack: attack, metrics: serverMetrics, number: served)
        }
    }

    /// An image without one whole sector (a 0-sector disk would only be refused by every
    /// frontend's handshake); exit status 1, as for an image that cannot be opened.
    struct ImageTooSmall: Error, CustomStringConvertible {
        let path: String
        var description: String { "\(path) is smaller than one 512-byte sector" }
    }

    /// Serves one frontend; its counts reach `metrics` while it is served (requests,
    /// bytes, rejections by rule), then the violation that dropped it or the refusal of
    /// its handshake.
    func serveOne(
        _ channel: UnixChannel, storage: any BlockStorage, attack: XenBackendAttack?, metrics: ServerMetrics,
        number: Int
    ) {
        metrics.connected(number)
        defer { metrics.disconnected() }
        do {
            let connection = try XenBlkBackendConnection.accept(
                channel: channel, storage: storage, hooks: attack.map(XenBackendAdversary.init))
            var live = XenBlkLiveCounts()
            let end = connection.run(wait: wait.strategy) { live.push($0.backend, to: metrics, connection: number) }
            live.push(connection.backend, to: metrics, connection: number, force: true)
            let b = connection.backend
            if case .dropped(let v) = end { metrics.violation(v.rule, connection: number) }
            print(
                "serve-xen-blk: connection \(end): \(b.servedRequests) requests, \(b.rejectedRequests) rejected"
                    + (b.lastRejection.map { " (last: \($0))" } ?? ""))
        } catch {
            metrics.refused(connection: number)
            print("serve-xen-blk: connection refused: \(error)")
        }
    }
}

/// What a blkif backend counted that `ServerMetrics` has not seen yet: pushed from the
/// serving thread at most every 10 ms (a scrape sees counts at most that old), and once
/// more when the connection ends.
struct XenBlkLiveCounts {
    var pushed = BlockDeviceStatistics()
    var lastPush: UInt64 = 0

    mutating func push(_ b: BlkBackend, to metrics: ServerMetrics, connection: Int, force: Bool = false) {
        let now = monotonicNanoseconds()
        guard force || now &- lastPush >= 10_000_000 else { return }
        lastPush = now
        var delta = BlockDeviceStatistics(
            requests: b.servedRequests - pushed.requests, bytesRead: b.bytesRead - pushed.bytesRead,
            bytesWritten: b.bytesWritten - pushed.bytesWritten, failed: b.rejectedRequests - pushed.failed)
        for (rule, n) in b.rejectionsByRule where n != pushed.violations[rule.rawValue, default: 0] {
            delta.violations[rule.rawValue] = n - pushed.violations[rule.rawValue, default: 0]
        }
        guard delta != BlockDeviceStatistics() else { return }
        pushed = BlockDeviceStatistics(
            requests: b.servedRequests, bytesRead: b.bytesRead, bytesWritten: b.bytesWritten,
            failed: b.rejectedRequests,
            violations: Dictionary(uniqueKeysWithValues: b.rejectionsByRule.map { ($0.key.rawValue, $0.value) }))
        metrics.add(delta, connection: connection)
    }
}

/// `ringfence xen-blk`: the hardened blkif frontend, in the shape of `blk` (the same
/// subcommands, byte sizes and `--json`). Exit 0 ok, 1 device or violation error (one line
/// naming the rule), 2 usage.
struct XenBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xen-blk",
        abstract: "Talk to a Xen-style blkif backend (serve-xen-blk) through the hardened frontend.",
        discussion: helpDiscussion(
            "The back-end is `ringfence serve-xen-blk` (Xen's blkif protocol over an emulated PV ring). Sizes and offsets are in bytes (4096, 4k, 16M), multiples of 512; transfers larger than one blkif request (11 pages, 44 KiB) are split internally. Exit 0 ok, 1 on a device error or a broken rule (one line naming it), 2 on a usage error.",
            examples: "ringfence serve-xen-blk --socket x.sock --image disk.img &",
            "ringfence xen-blk --socket x.sock verify --size 16M",
            "ringfence xen-blk --socket x.sock bench --rw randread --bs 4k --iodepth 16"),
        subcommands: [
            XenBlkInfoCommand.self, XenBlkRead.self, XenBlkWrite.self, XenBlkVerify.self, XenBlkFlush.self,
            XenBlkDiscard.self, XenBlkBench.self, XenBlkAudit.self, XenBlkFormat.self,
        ])

    @Option(help: "Path of the back-end's Unix socket.")
    var socket: String

    @Option(
        help: ArgumentHelp(
            "Deadline in seconds for each operation as a whole: connecting (with the handshake), each request, "
                + "closing."))
    var timeout: Double = 5

    @OptionGroup var wait: WaitOptions

    @OptionGroup(title: "Verified payload (docs/verified-block.md)")
    var verified: VerifiedOptions

    func validate() throws {
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be in (0, 3600]") }
    }

    /// Connects and runs the handshake, or exits 1 with the error.
    func open() throws -> XenBlkFrontendDevice {
        let device = try orExit("xen-blk") { () throws(XenConnectError) -> XenBlkFrontendDevice in
            let deadline = Deadline.after(seconds: timeout)
            let channel: UnixChannel
            do throws(UnixChannel.Error) { channel = try UnixChannel.connect(path: socket, until: deadline) } catch {
                throw .channel(error)
            }
            return try XenBlkFrontendDevice.connect(channel: channel, until: deadline)
        }
        device.timeout = timeout
        device.wait = wait.strategy
        return device
    }

    /// Runs `body` on the verified layer (`--key`/`--anchor` or `--root-hash`) over the frontend.
    func withVerified(format: Bool = false, _ body: (VerifiedDisk) throws -> Void) throws {
        let device = try open()
        defer { device.disconnect() }
        let disk = try verified.open(device, format: format)
        defer { disk.close() }
        try body(disk)
    }

    /// The largest transfer one blkif request carries.
    static let chunk = BlkifLayout.maxSegments * 4096

    /// Reads `count` bytes at byte `offset`, one blkif request per 44 KiB.
    static func read(_ device: XenBlkFrontendDevice, offset: Int, count: Int) throws -> [UInt8] {
        var data = [UInt8](repeating: 0, count: count)
        try data.withUnsafeMutableBytes { all in
            var done = 0
            while done < count {
                let n = min(chunk, count - done)
                let sector = UInt64((offset + done) / BlkifLayout.sectorSize)
                try orExit("xen-blk") { () throws(XenBlkError) in
                    try device.read(sector: sector, into: UnsafeMutableRawBufferPointer(rebasing: all[done..<done + n]))
                }
                done += n
            }
        }
        return data
    }

    /// Writes `data` at byte `offset`, one blkif request per 44 KiB.
    static func write(_ device: XenBlkFrontendDevice, offset: Int, data: [UInt8]) throws {
        try data.withUnsafeBytes { all in
            var done = 0
            while done < all.count {
                let n = min(chunk, all.count - done)
                let sector = UInt64((offset + done) / BlkifLayout.sectorSize)
                try orExit("xen-blk") { () throws(XenBlkError) in
                    try device.write(sector: sector, from: UnsafeRawBufferPointer(rebasing: all[done..<done + n]))
                }
                done += n
            }
        }
    }
}

/// A byte range for the blkif frontend: offset and length in whole 512-byte sectors.
func checkSectors(_ name: String, _ value: Int, positive: Bool = false) throws {
    guard value % BlkifLayout.sectorSize == 0, !positive || value > 0 else {
        throw ValidationError("--\(name) must be a\(positive ? " positive" : "") multiple of 512 bytes")
    }
}

struct XenBlkInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "Show the validated geometry (what the backend announced).",
        discussion: helpDiscussion(
            "Capacity, sector size, ring slots and the largest request, after the frontend checked them.",
            examples: "ringfence xen-blk --socket x.sock info", "ringfence xen-blk --socket x.sock info --json"))
    @ParentCommand var blk: XenBlkCommand
    @Flag(help: "Print the result as JSON.") var json = false

    func run() throws {
        if blk.verified.enabled { return try blk.withVerified { $0.info() } }
        let device = try blk.open()
        defer { device.disconnect() }
        let i = device.info
        let r = XenBlkInfoResult(
            capacity: i.sectors * 512, sectors: i.sectors, sectorSize: Int(i.sectorSize), readOnly: i.readOnly,
            flush: i.flushCache, discard: i.discard, ringSlots: device.front.ringSize, maxTransfer: XenBlkCommand.chunk)
        if json { return printJSON(r) }
        print("capacity:      \(r.capacity) bytes (\(r.sectors) sectors)")
        print("sector size:   \(r.sectorSize)")
        print("ring:          \(r.ringSlots) slots")
        print("max transfer:  \(r.maxTransfer) (larger transfers are split)")
        print("read-only:     \(r.readOnly ? "yes" : "no")")
        print("flush:         \(r.flush ? "yes" : "no")")
        print("discard:       \(r.discard ? "yes" : "no")")
    }
}

struct XenBlkRead: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "read", abstract: "Read a range to a file or stdout.",
        discussion: helpDiscussion(
            "Offset and length in bytes, multiples of 512.",
            examples: "ringfence xen-blk --socket x.sock read --offset 0 --length 4k | xxd",
            "ringfence xen-blk --socket x.sock read --offset 1M --length 4k --output o"))
    @ParentCommand var blk: XenBlkCommand
    @Option(help: "Byte offset (4k, 1M...).") var offset: Size
    @Option(help: "Bytes (4k, 16M...).") var length: Size
    @Option(help: "Write the bytes here instead of stdout.") var output: String?

    func validate() throws {
        try checkSectors("offset", offset.bytes)
        try checkSectors("length", length.bytes, positive: true)
    }

    func run() throws {
        if blk.verified.enabled {
            guard offset.bytes % 4096 == 0, length.bytes % 4096 == 0 else {
                throw ValidationError("verified reads are whole 4 KiB blocks")
            }
            return try blk.withVerified {
                try $0.read(block: UInt64(offset.bytes / 4096), count: length.bytes / 4096, output: output)
            }
        }
        let device = try blk.open()
        defer { device.disconnect() }
        let out: FileHandle
        if let output {
            guard FileManager.default.createFile(atPath: output, contents: nil),
                let h = FileHandle(forWritingAtPath: output)
            else {
                FileHandle.standardError.write(Data("ringfence xen-blk: cannot create \(output)\n".utf8))
                throw ExitCode(1)
            }
            out = h
        } else {
            out = FileHandle.standardOutput
        }
        var done = 0
        while done < length.bytes {
            let n = min(4 << 20, length.bytes - done)
            out.write(Data(try XenBlkCommand.read(device, offset: offset.bytes + done, count: n)))
            done += n
        }
    }
}

struct XenBlkWrite: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "write", abstract: "Write a file (or stdin) at an offset.",
        discussion: helpDiscussion(
            "The input's length must be a multiple of 512.",
            examples: "ringfence xen-blk --socket x.sock write --offset 0 --input in.bin",
            "ringfence xen-blk --socket x.sock write --offset 4k < in.bin"))
    @ParentCommand var blk: XenBlkCommand
    @Option(help: "Byte offset (4k, 1M...).") var offset: Size
    @Option(help: "Read the bytes from this file instead of stdin.") var input: String?

    func validate() throws { try checkSectors("offset", offset.bytes) }

    func run() throws {
        let data: Data
        if let input {
            guard let d = FileManager.default.contents(atPath: input) else {
                throw ValidationError("cannot read \(input)")
            }
            data = d
        } else {
            data = FileHandle.standardInput.readDataToEndOfFile()
        }
        if blk.verified.enabled {
            guard offset.bytes % 4096 == 0 else { throw ValidationError("verified writes are whole 4 KiB blocks") }
            return try blk.withVerified { try $0.write(block: UInt64(offset.bytes / 4096), data: [UInt8](data)) }
        }
        guard data.count % BlkifLayout.sectorSize == 0, data.count > 0 else {
            FileHandle.standardError.write(
                Data("ringfence xen-blk: input of \(data.count) bytes is not a positive multiple of 512\n".utf8))
            throw ExitCode(2)
        }
        let device = try blk.open()
        defer { device.disconnect() }
        try XenBlkCommand.write(device, offset: offset.bytes, data: [UInt8](data))
        print("wrote \(data.count) bytes at \(offset.bytes)")
    }
}

struct XenBlkVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify", abstract: "Write a seeded pattern, read it back, compare.",
        discussion: helpDiscussion(
            "Exit 1 on the first byte that differs.", examples: "ringfence xen-blk --socket x.sock verify",
            "ringfence xen-blk --socket x.sock verify --size 16M --seed 7"))
    @ParentCommand var blk: XenBlkCommand
    @Option(help: "Bytes to verify from offset 0.") var size: Size = Size(1 << 20)
    @Option(help: "Pattern seed.") var seed: UInt64 = 1

    func validate() throws { try checkSectors("size", size.bytes, positive: true) }

    func run() throws {
        if blk.verified.enabled {
            return try blk.withVerified { try $0.verify(blocks: max(1, size.bytes / 4096), seed: seed) }
        }
        let device = try blk.open()
        defer { device.disconnect() }
        let expected = pattern(seed: seed, offset: 0, count: size.bytes)
        let start = monotonicNanoseconds()
        try XenBlkCommand.write(device, offset: 0, data: expected)
        if device.info.flushCache { try orExit("xen-blk") { () throws(XenBlkError) in try device.flush() } }
        let back = try XenBlkCommand.read(device, offset: 0, count: size.bytes)
        let ms = Double(monotonicNanoseconds() - start) / 1e6
        if let i = zip(expected, back).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            FileHandle.standardError.write(Data("ringfence xen-blk: verify FAILED: first mismatch at byte \(i)\n".utf8))
            throw ExitCode(1)
        }
        print("verify OK: \(size.bytes) bytes, seed \(seed), \(format(ms, 1)) ms")
    }
}

struct XenBlkFlush: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flush", abstract: "Flush the backend's write cache.",
        discussion: helpDiscussion(
            "", examples: "ringfence xen-blk --socket x.sock flush",
            "ringfence xen-blk --socket x.sock --timeout 30 flush"))
    @ParentCommand var blk: XenBlkCommand

    func run() throws {
        guard !blk.verified.enabled else { throw ValidationError("the verified layer flushes every write itself") }
        let device = try blk.open()
        defer { device.disconnect() }
        try orExit("xen-blk") { () throws(XenBlkError) in try device.flush() }
        print("flushed")
    }
}

struct XenBlkDiscard: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "discard", abstract: "Discard a range.",
        discussion: helpDiscussion(
            "Offset and length in bytes, multiples of 512.",
            examples: "ringfence xen-blk --socket x.sock discard --offset 0 --length 16M",
            "ringfence xen-blk --socket x.sock discard --offset 1M --length 4k"))
    @ParentCommand var blk: XenBlkCommand
    @Option(help: "Byte offset (4k, 1M...).") var offset: Size
    @Option(help: "Bytes (4k, 16M...).") var length: Size

    func validate() throws {
        try checkSectors("offset", offset.bytes)
        try checkSectors("length", length.bytes, positive: true)
    }

    func run() throws {
        guard !blk.verified.enabled else { throw ValidationError("discard bypasses the verified layer") }
        let device = try blk.open()
        defer { device.disconnect() }
        try orExit("xen-blk") { () throws(XenBlkError) in
            try device.discard(sector: UInt64(offset.bytes / 512), sectors: UInt64(length.bytes / 512))
        }
        print("discarded \(length.bytes) bytes at \(offset.bytes)")
    }
}

struct XenBlkBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "fio-like benchmark: IOPS, MiB/s, latency percentiles.",
        discussion: helpDiscussion(
            "Like fio: --rw, --bs, --iodepth, --runtime; a progress line each second on a terminal; --json with fio's names.",
            examples: "ringfence xen-blk --socket x.sock bench --rw randread --bs 4k --iodepth 16",
            "ringfence xen-blk --socket x.sock --poll bench --iodepth 1 --runtime 5",
            "ringfence xen-blk --socket x.sock bench --rw write --bs 44k --json"))
    @ParentCommand var blk: XenBlkCommand
    @Option(help: "Pattern.") var rw: BenchMode = .randread
    @Option(help: "Block size in bytes (512...44k, a multiple of 512).") var bs: Size = Size(4096)
    @Option(help: "Requests in flight (1...32, the ring's slots).") var iodepth: Int = 16
    @Option(help: "Seconds to run.") var runtime: Double = 10
    @Option(help: "Bytes of the disk to cover (default: all of it).") var size: Size?
    @Flag(help: "Print the result as JSON (fio's names: iops, bw in KiB/s, lat_ns percentiles).") var json = false

    func validate() throws {
        guard iodepth >= 1, iodepth <= BlkifLayout.ringSize else { throw ValidationError("--iodepth must be 1...32") }
        guard runtime > 0, runtime <= 3600 else { throw ValidationError("--runtime must be in (0, 3600]") }
        guard bs.bytes >= 512, bs.bytes <= XenBlkCommand.chunk, bs.bytes % 512 == 0 else {
            throw ValidationError("--bs must be a multiple of 512 in 512...44k")
        }
    }

    func run() throws {
        if blk.verified.enabled {
            guard rw == .randread || rw == .randwrite, bs.bytes == 4096 else {
                throw ValidationError("verified bench runs --rw randread or randwrite with --bs 4k")
            }
            return try blk.withVerified { try $0.bench(write: rw == .randwrite, depth: iodepth, seconds: runtime) }
        }
        let device = try blk.open()
        defer { device.disconnect() }
        let capacity = Int(clamping: device.info.sectors * 512)
        if rw != .read && rw != .randread && device.info.readOnly {
            FileHandle.standardError.write(Data("ringfence xen-blk: error: the backend is read-only\n".utf8))
            throw ExitCode(1)
        }
        let blocks = UInt64(min(size?.bytes ?? capacity, capacity) / bs.bytes)
        guard blocks >= 1 else { throw ValidationError("the disk is smaller than --bs") }
        var bench = BlockBench(
            pattern: rw.pattern, blockSize: bs.bytes, depth: iodepth, seconds: runtime, blocks: blocks)
        bench.recordsLatency = true
        let progress = BlockBenchProgress()
        let line = ProgressLine(json: json)
        let r = line.during(runtime: runtime, bs: bs.bytes, progress: progress) {
            bench.run(device, progress: progress)
        }
        let error = r.firstError.map { "\($0)" }
        let result = BlockBenchResult(
            rw: rw.rawValue, bs: bs.bytes, iodepth: iodepth, queues: 1, seconds: r.seconds, ios: r.requests,
            latencies: r.latencies, error: error)
        if json { print(result.json) } else { printBench(result) }
        if let error {
            FileHandle.standardError.write(Data("ringfence xen-blk: error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct XenBlkAudit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Send each malformed request, each on a fresh connection, and judge how the backend reacted.",
        discussion: helpDiscussion(
            "Each attack runs on a fresh connection; the report says how the backend reacted. Exit 1 if a backend accepted what it should have refused.",
            examples: "ringfence xen-blk --socket x.sock audit",
            "ringfence xen-blk --socket x.sock audit --attack segments-12"))
    @ParentCommand var blk: XenBlkCommand
    @Option(help: "One of \(XenFrontendAttack.allCases.map(\.rawValue).joined(separator: ", ")) (default: all).")
    var attack: String?

    func validate() throws {
        if let attack, XenFrontendAttack(rawValue: attack) == nil { throw ValidationError("unknown attack \(attack)") }
    }

    func run() throws {
        let attacks = attack.flatMap(XenFrontendAttack.init(rawValue:)).map { [$0] } ?? XenFrontendAttack.allCases
        let records = try Auditor.auditXenBackend(socket: blk.socket, attacks: attacks, timeout: blk.timeout) {
            print($0)
        }
        if records.contains(where: { !$0.isSafe }) { throw ExitCode(1) }
    }
}

struct XenBlkFormat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "format",
        abstract: "Format the device as a verified device (needs --key and --anchor; makes the key if missing).",
        discussion: helpDiscussion(
            "See docs/verified-block.md.", examples: "ringfence xen-blk --socket x.sock --key k --anchor a format",
            "ringfence xen-blk --socket x.sock --key k --anchor a verify --size 16M"))
    @ParentCommand var blk: XenBlkCommand

    func run() throws {
        guard blk.verified.key != nil else { throw ValidationError("format needs --key FILE and --anchor FILE") }
        try blk.withVerified(format: true) { disk in
            print("formatted: \(disk.blocks) verified blocks of 4096 bytes")
            disk.info()
        }
    }
}
