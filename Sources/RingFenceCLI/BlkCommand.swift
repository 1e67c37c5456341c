import ArgumentParser
import Dispatch
import Foundation
import Histogram
import RingFenceResults
import SharedMemory
import VerifiedBlock
import VirtioBlock

/// `ringfence blk`: a thin shell over `VirtioBlock.VirtioBlockDriver`.
/// Exit 0 ok, 1 device or violation error (one line naming the rule), 2 usage.
struct Blk: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "blk",
        abstract: "Talk to a vhost-user-blk back-end with the hardened virtio-blk driver.",
        discussion: helpDiscussion(
            "The back-end is qemu-storage-daemon, SPDK, `ringfence serve-blk` or any vhost-user-blk device. Sizes and offsets are in bytes (4096, 4k, 16M); transfers larger than the device allows are split internally. Exit 0 ok, 1 on a device error or a broken rule (one line naming it), 2 on a usage error.",
            examples: "ringfence serve-blk --socket blk.sock --image disk.img &",
            "ringfence blk --socket blk.sock verify --size 16M",
            "ringfence blk --socket blk.sock bench --rw randread --bs 4k --iodepth 32"),
        subcommands: [
            BlkInfo.self, BlkRead.self, BlkWrite.self, BlkVerify.self, BlkFlush.self, BlkDiscard.self,
            BlkWriteZeroes.self, BlkBench.self, BlkFormat.self,
        ])

    @Option(help: "Path of the back-end's vhost-user socket.")
    var socket: String

    @Option(help: "Queues to use (clamped to what the device offers).")
    var queues: Int = 1

    @Option(
        help: ArgumentHelp(
            "Deadline in seconds for each operation as a whole: connecting (with negotiation and ring set-up), "
                + "each request, closing."))
    var timeout: Double = 10

    @Flag(help: "If the back-end goes away, reconnect and resubmit in-flight requests.")
    var reconnect = false

    @Flag(name: .customLong("no-packed"), help: "Use split virtqueues even if the back-end offers packed ones.")
    var noPacked = false

    @OptionGroup var wait: WaitOptions

    @OptionGroup(title: "Verified payload (docs/verified-block.md)")
    var verified: VerifiedOptions

    func validate() throws {
        guard queues >= 1, queues <= 64 else { throw ValidationError("--queues must be 1...64") }
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be in (0, 3600]") }
    }

    /// Opens the device or exits 1 with the error.
    func open(queueSize: Int = 128) throws -> VirtioBlockDriver {
        var options = VirtioBlockDriver.Options()
        options.queues = queues
        options.requestTimeout = timeout
        options.controlTimeout = timeout
        options.reconnect = reconnect
        options.queueSize = queueSize
        options.packedRing = !noPacked
        options.wait = wait.strategy
        return try runOrExit { () throws(VirtioError) in try VirtioBlockDriver.connect(socket: socket, options: options)
        }
    }
}

/// Runs a device operation; a `VirtioError` becomes one line on stderr and exit 1.
func runOrExit<T>(_ body: () throws(VirtioError) -> T) throws -> T {
    do {
        return try body()
    } catch {
        FileHandle.standardError.write(Data("ringfence blk: error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

/// Parses fio-style sizes: 4096, 4k, 1M, 2G (powers of 1024).
func parseSize(_ text: String) -> Int? {
    let t = text.trimmingCharacters(in: .whitespaces).lowercased()
    guard let last = t.last else { return nil }
    var number = t
    var multiplier = 1
    switch last {
    case "k": multiplier = 1 << 10
    case "m": multiplier = 1 << 20
    case "g": multiplier = 1 << 30
    case "t": multiplier = 1 << 40
    default: break
    }
    if multiplier != 1 { number.removeLast() }
    guard let n = Int(number), n >= 0 else { return nil }
    let (v, overflow) = n.multipliedReportingOverflow(by: multiplier)
    return overflow ? nil : v
}

struct Size: ExpressibleByArgument {
    let bytes: Int
    init?(argument: String) {
        guard let b = parseSize(argument) else { return nil }
        bytes = b
    }
    init(_ bytes: Int) { self.bytes = bytes }
    var defaultValueDescription: String { "\(bytes)" }
}

struct BlkInfo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info", abstract: "Show the validated geometry.",
        discussion: helpDiscussion(
            "Capacity, block size, queues, features and limits, after the driver checked them.",
            examples: "ringfence blk --socket blk.sock info", "ringfence blk --socket blk.sock --queues 4 info",
            "ringfence blk --socket blk.sock info --json"))
    @ParentCommand var blk: Blk
    @Flag(help: "Print the result as JSON.") var json = false

    func run() throws {
        if blk.verified.enabled { return try blk.withVerified { $0.info() } }
        let disk = try blk.open()
        defer { disk.close() }
        let i = disk.info
        let r = BlkInfoResult(
            capacity: i.capacityBytes, blockSize: i.blockSize, queues: i.queueCount,
            deviceQueues: Int(i.rawConfig.numQueues), segMax: i.segmentsPerRequest, sizeMax: i.segmentSizeMax,
            maxTransfer: i.maxTransfer, readOnly: i.readOnly, flush: i.supportsFlush, discard: i.supportsDiscard,
            maxDiscard: i.supportsDiscard ? UInt64(i.maxDiscardBytes) : 0, writeZeroes: i.supportsWriteZeroes,
            maxWriteZeroes: i.supportsWriteZeroes ? UInt64(i.maxWriteZeroesBytes) : 0, features: i.features,
            serial: try? disk.identify())
        if json { return printJSON(r) }
        print("capacity:      \(r.capacity) bytes (\(r.sectors) sectors)")
        print("block size:    \(r.blockSize)")
        print("queues:        \(r.queues) (device offers \(r.deviceQueues))")
        print("seg max:       \(r.segMax)")
        print("size max:      \(r.sizeMax == 0 ? "unlimited" : "\(r.sizeMax)")")
        print("max transfer:  \(r.maxTransfer)")
        print("read-only:     \(r.readOnly ? "yes" : "no")")
        print("flush:         \(r.flush ? "yes" : "no")")
        print("discard:       \(r.discard ? "yes (max \(r.maxDiscard) bytes)" : "no")")
        print("write zeroes:  \(r.writeZeroes ? "yes (max \(r.maxWriteZeroes) bytes)" : "no")")
        print("features:      0x\(String(r.features, radix: 16))")
        print("serial:        \(r.serial ?? "-")")
    }
}

struct BlkRead: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "read", abstract: "Read a range to a file or stdout.",
        discussion: helpDiscussion(
            "Offset and length in bytes, any alignment the device allows.",
            examples: "ringfence blk --socket blk.sock read --offset 0 --length 4k | xxd",
            "ringfence blk --socket blk.sock read --offset 1M --length 4k --output o"))
    @ParentCommand var blk: Blk
    @Option(help: "Byte offset (4k, 1M...).") var offset: Size
    @Option(help: "Bytes (4k, 16M...).") var length: Size
    @Option(help: "Write the bytes here instead of stdout.") var output: String?

    func run() throws {
        if blk.verified.enabled {
            guard offset.bytes % 4096 == 0, length.bytes % 4096 == 0, length.bytes > 0 else {
                throw ValidationError("verified reads are whole 4 KiB blocks")
            }
            return try blk.withVerified {
                try $0.read(block: UInt64(offset.bytes / 4096), count: length.bytes / 4096, output: output)
            }
        }
        let disk = try blk.open()
        defer { disk.close() }
        let out: FileHandle
        if let output {
            guard FileManager.default.createFile(atPath: output, contents: nil),
                let h = FileHandle(forWritingAtPath: output)
            else {
                FileHandle.standardError.write(Data("ringfence blk: cannot create \(output)\n".utf8))
                throw ExitCode(1)
            }
            out = h
        } else {
            out = FileHandle.standardOutput
        }
        var done = 0
        while done < length.bytes {
            let n = min(4 << 20, length.bytes - done)
            let bytes = try runOrExit { () throws(VirtioError) in
                try disk.read(at: UInt64(offset.bytes + done), count: n)
            }
            out.write(Data(bytes))
            done += n
        }
    }
}

struct BlkWrite: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "write", abstract: "Write a file (or stdin) at an offset.",
        discussion: helpDiscussion(
            "The whole input is written, split into requests the device accepts.",
            examples: "ringfence blk --socket blk.sock write --offset 0 --input in.bin",
            "ringfence blk --socket blk.sock write --offset 4k < in.bin"))
    @ParentCommand var blk: Blk
    @Option(help: "Byte offset (4k, 1M...).") var offset: Size
    @Option(help: "Read the bytes from this file instead of stdin.") var input: String?

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
        let disk = try blk.open()
        defer { disk.close() }
        guard data.count % disk.info.blockSize == 0, data.count > 0 else {
            FileHandle.standardError.write(
                Data(
                    "ringfence blk: input of \(data.count) bytes is not a positive multiple of the \(disk.info.blockSize)-byte block size\n"
                        .utf8))
            throw ExitCode(2)
        }
        try runOrExit { () throws(VirtioError) in try disk.write(at: UInt64(offset.bytes), bytes: [UInt8](data)) }
        print("wrote \(data.count) bytes at \(offset.bytes)")
    }
}

/// The seeded pattern `verify` writes: splitmix64 per 8-byte word, keyed by offset.
func pattern(seed: UInt64, offset: Int, count: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        var z = seed &+ UInt64(offset + i) &* 0x9e37_79b9_7f4a_7c15
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        z ^= z >> 31
        for k in 0..<min(8, count - i) { bytes[i + k] = UInt8(truncatingIfNeeded: z >> (8 * k)) }
        i += 8
    }
    return bytes
}

struct BlkVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify", abstract: "Write a seeded pattern, read it back, compare.",
        discussion: helpDiscussion(
            "Exit 1 on the first byte that differs.", examples: "ringfence blk --socket blk.sock verify",
            "ringfence blk --socket blk.sock verify --size 16M --seed 7"))
    @ParentCommand var blk: Blk
    @Option(help: "Bytes to verify from offset 0.") var size: Size = Size(1 << 20)
    @Option(help: "Pattern seed.") var seed: UInt64 = 1

    func run() throws {
        if blk.verified.enabled {
            return try blk.withVerified { try $0.verify(blocks: max(1, size.bytes / 4096), seed: seed) }
        }
        let disk = try blk.open()
        defer { disk.close() }
        let total = size.bytes
        guard total > 0, total % disk.info.blockSize == 0 else {
            throw ValidationError("--size must be a positive multiple of \(disk.info.blockSize)")
        }
        let expected = pattern(seed: seed, offset: 0, count: total)
        let start = monotonicNanoseconds()
        try runOrExit { () throws(VirtioError) in try disk.write(at: 0, bytes: expected) }
        let back = try runOrExit { () throws(VirtioError) in try disk.read(at: 0, count: total) }
        let ms = Double(monotonicNanoseconds() - start) / 1e6
        if let i = zip(expected, back).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
            FileHandle.standardError.write(Data("ringfence blk: verify FAILED: first mismatch at byte \(i)\n".utf8))
            throw ExitCode(1)
        }
        print("verify OK: \(total) bytes, seed \(seed), \(format(ms, 1)) ms")
    }
}

struct BlkFlush: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flush", abstract: "Flush the device's write cache.",
        discussion: helpDiscussion(
            "", examples: "ringfence blk --socket blk.sock flush", "ringfence blk --socket blk.sock --timeout 30 flush")
    )
    @ParentCommand var blk: Blk
    func run() throws {
        if blk.verified.enabled {
            return try blk.withVerified { disk in
                if case .sealed(let d) = disk { try runVerified { () throws(VerifiedBlockError) in try d.flush() } }
                print("flushed")
            }
        }
        let disk = try blk.open()
        defer { disk.close() }
        try runOrExit { () throws(VirtioError) in try disk.flush() }
        print("flushed")
    }
}

struct BlkDiscard: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "discard", abstract: "Discard a range.",
        discussion: helpDiscussion(
            "The device must offer VIRTIO_BLK_F_DISCARD.",
            examples: "ringfence blk --socket blk.sock discard --offset 0 --length 16M",
            "ringfence blk --socket blk.sock discard --offset 1M --length 4k"))
    @ParentCommand var blk: Blk
    @Option(help: "Byte offset (4k, 1M...).") var offset: Size
    @Option(help: "Bytes (4k, 16M...).") var length: Size
    func run() throws {
        guard !blk.verified.enabled else { throw ValidationError("discard bypasses the verified layer") }
        let disk = try blk.open()
        defer { disk.close() }
        try runOrExit { () throws(VirtioError) in try disk.discard(at: UInt64(offset.bytes), length: length.bytes) }
        print("discarded \(length.bytes) bytes at \(offset.bytes)")
    }
}

struct BlkWriteZeroes: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "write-zeroes", abstract: "Write zeroes over a range.",
        discussion: helpDiscussion(
            "The device must offer VIRTIO_BLK_F_WRITE_ZEROES.",
            examples: "ringfence blk --socket blk.sock write-zeroes --offset 0 --length 16M",
            "ringfence blk --socket blk.sock write-zeroes --offset 0 --length 1M --unmap"))
    @ParentCommand var blk: Blk
    @Option(help: "Byte offset (4k, 1M...).") var offset: Size
    @Option(help: "Bytes (4k, 16M...).") var length: Size
    @Flag(help: "Allow the device to unmap the range.") var unmap = false
    func run() throws {
        guard !blk.verified.enabled else { throw ValidationError("write-zeroes bypasses the verified layer") }
        let disk = try blk.open()
        defer { disk.close() }
        try runOrExit { () throws(VirtioError) in
            try disk.writeZeroes(at: UInt64(offset.bytes), length: length.bytes, unmap: unmap)
        }
        print("zeroed \(length.bytes) bytes at \(offset.bytes)")
    }
}

extension RingFence {
    /// Usage errors exit 2 (the convention of `ringfence blk`), not ArgumentParser's 64.
    /// `ringfence CMD SUB --help` answers with SUB's help (`subcommandHelpRequest`).
    static func main() {
        do {
            var command = try parseAsRoot(subcommandHelpRequest(Array(CommandLine.arguments.dropFirst())))
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .validationFailure {
                FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
                Foundation.exit(2)
            }
            exit(withError: error)
        }
    }
}

extension Blk {
    /// Runs `body` on the verified layer (`--key`/`--anchor` or `--root-hash`) over this driver.
    func withVerified(format: Bool = false, _ body: (VerifiedDisk) throws -> Void) throws {
        let driver = try open()
        defer { driver.close() }
        let disk = try verified.open(driver, format: format)
        defer { disk.close() }
        try body(disk)
    }
}

struct BlkFormat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "format",
        abstract: "Format the device as a verified device (needs --key and --anchor; makes the key if missing).",
        discussion: helpDiscussion(
            "See docs/verified-block.md.", examples: "ringfence blk --socket blk.sock --key k --anchor a format",
            "ringfence blk --socket blk.sock --key k --anchor a verify --size 16M"))
    @ParentCommand var blk: Blk

    func run() throws {
        guard blk.verified.key != nil else { throw ValidationError("format needs --key FILE and --anchor FILE") }
        try blk.withVerified(format: true) { disk in
            print("formatted: \(disk.blocks) verified blocks of 4096 bytes")
            disk.info()
        }
    }
}
