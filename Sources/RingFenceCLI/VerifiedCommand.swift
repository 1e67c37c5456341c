import ArgumentParser
import Foundation
import SharedMemory
import VerifiedBlock

#if canImport(Glibc)
import Glibc
#endif

/// The options that put `blk` and `xen-blk` in verified mode (`--key` and `--anchor`) or
/// in the read-only verity mode (`--root-hash`). Without them the plain driver runs.
struct VerifiedOptions: ParsableArguments {
    @Option(help: "32-byte key file: verified mode, with --anchor (`format` creates the key if missing).")
    var key: String?

    @Option(help: "The verified device's local anchor file (its Merkle root; keep it off the back-end).")
    var anchor: String?

    @Option(
        name: .customLong("root-hash"),
        help: "Verity mode (read-only, no key): check every read against this root hash from `ringfence seal`.")
    var rootHash: String?

    var enabled: Bool { key != nil || anchor != nil || rootHash != nil }

    func validate() throws {
        if let rootHash {
            guard key == nil, anchor == nil else { throw ValidationError("--root-hash excludes --key and --anchor") }
            guard let bytes = parseHex(rootHash), bytes.count == 32 else {
                throw ValidationError("--root-hash must be 64 hex digits")
            }
        } else if enabled {
            guard key != nil, anchor != nil else { throw ValidationError("--key and --anchor go together") }
        }
    }

    /// The key file's 32 bytes; `create` makes a new random key (mode 0600) if it is missing.
    func loadKey(create: Bool) throws -> [UInt8] {
        let path = key ?? ""
        if create && !FileManager.default.fileExists(atPath: path) {
            var rng = SystemRandomNumberGenerator()
            let bytes = (0..<32).map { _ in UInt8.random(in: 0...255, using: &rng) }
            guard
                FileManager.default.createFile(
                    atPath: path, contents: Data(bytes), attributes: [.posixPermissions: 0o600])
            else { throw VerifiedCLIError("cannot create key file \(path)") }
            print("created key file \(path)")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VerifiedCLIError("cannot read key file \(path)")
        }
        guard data.count == 32 else { throw VerifiedCLIError("key file \(path) holds \(data.count) bytes, not 32") }
        return [UInt8](data)
    }

    /// Opens (or with `format`, formats) the verified layer over `transport`.
    func open(_ transport: any BlockTransport, format: Bool = false) throws -> VerifiedDisk {
        if let rootHash {
            if format { throw VerifiedCLIError("verity images are made with `ringfence seal IMAGE`") }
            let root = parseHex(rootHash) ?? []
            return .verity(
                try runVerified { () throws(VerifiedBlockError) in
                    try VerityDevice(transport: transport, rootHash: root)
                })
        }
        let keyBytes = try loadKey(create: format)
        let anchorPath = anchor ?? ""
        if format {
            return .sealed(
                try runVerified { () throws(VerifiedBlockError) in
                    try VerifiedBlockDevice.format(
                        transport: transport, key: keyBytes, anchorPath: anchorPath)
                })
        }
        return .sealed(
            try runVerified { () throws(VerifiedBlockError) in
                try VerifiedBlockDevice.open(
                    transport: transport, key: keyBytes, anchorPath: anchorPath)
            })
    }
}

struct VerifiedCLIError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A `VerifiedBlockError` becomes one line on stderr and exit 1 (a payload lie names its rule).
func runVerified<T>(_ body: () throws(VerifiedBlockError) -> T) throws -> T {
    do {
        return try body()
    } catch {
        FileHandle.standardError.write(Data("ringfence: verified: error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

/// The verified layer the command opened: sealed (key and anchor) or verity (root hash).
enum VerifiedDisk {
    case sealed(VerifiedBlockDevice)
    case verity(VerityDevice)

    var blocks: UInt64 {
        switch self {
        case .sealed(let d): return d.blocks
        case .verity(let d): return d.blocks
        }
    }

    func read(block: UInt64, count: Int) throws(VerifiedBlockError) -> [UInt8] {
        switch self {
        case .sealed(let d): return try d.read(block: block, count: count)
        case .verity(let d): return try d.read(block: block, count: count)
        }
    }

    func write(block: UInt64, bytes: [UInt8]) throws(VerifiedBlockError) {
        guard case .sealed(let d) = self else { throw .readOnly }
        try d.write(block: block, bytes: bytes)
        try d.flush()
    }

    func close() {
        if case .sealed(let d) = self { d.close() }
    }

    // MARK: the actions both `blk` and `xen-blk` offer in verified mode

    func info() {
        switch self {
        case .sealed(let d):
            print("mode:          verified (AES-256-GCM per 4 KiB block, Merkle root in the anchor)")
            print("blocks:        \(d.blocks) (\(d.blocks * 4096) bytes)")
            print("device id:     \(hexString(d.deviceID))")
            print("root:          \(hexString(d.rootHash))")
            print("pending:       \(d.pendingWrites) writes since the last flush")
        case .verity(let d):
            print("mode:          verity (read-only, SHA-256 hash tree)")
            print("blocks:        \(d.blocks) (\(d.blocks * 4096) bytes)")
            print("hash levels:   \(d.layout.levelBlocks.map(String.init).joined(separator: ", ")) blocks")
            print("root hash:     \(hexString(d.rootHash))")
        }
    }

    func read(block: UInt64, count: Int, output: String?) throws {
        let bytes = try runVerified { () throws(VerifiedBlockError) in try read(block: block, count: count) }
        if let output {
            guard FileManager.default.createFile(atPath: output, contents: Data(bytes)) else {
                throw VerifiedCLIError("cannot write \(output)")
            }
        } else {
            FileHandle.standardOutput.write(Data(bytes))
        }
    }

    func write(block: UInt64, data: [UInt8]) throws {
        guard !data.isEmpty, data.count % 4096 == 0 else {
            FileHandle.standardError.write(
                Data("ringfence: verified: input of \(data.count) bytes is not a positive multiple of 4096\n".utf8))
            throw ExitCode(2)
        }
        try runVerified { () throws(VerifiedBlockError) in try write(block: block, bytes: data) }
        print("wrote \(data.count) bytes at block \(block) (sealed, flushed)")
    }

    /// Writes a seeded pattern over `blocks` blocks (sealed mode), reads them back verified.
    func verify(blocks count: Int, seed: UInt64) throws {
        let n = min(count, Int(clamping: blocks))
        let expected = pattern(seed: seed, offset: 0, count: n * 4096)
        if case .sealed = self {
            try runVerified { () throws(VerifiedBlockError) in try write(block: 0, bytes: expected) }
        }
        let back = try runVerified { () throws(VerifiedBlockError) in try read(block: 0, count: n) }
        if case .verity = self {
            print("verify OK (verity): \(n * 4096) bytes read and checked against the root hash")
            return
        }
        guard back == expected else {
            FileHandle.standardError.write(Data("ringfence: verified: verify FAILED\n".utf8))
            throw ExitCode(1)
        }
        print("verify OK (verified): \(n * 4096) bytes, seed \(seed), sealed, flushed, read back authenticated")
    }

    func bench(write: Bool, depth: Int, seconds: Double) throws {
        guard case .sealed(let d) = self else {
            throw VerifiedCLIError("bench needs the verified mode (--key, --anchor)")
        }
        let bench = VerifiedBench(pattern: write ? .write : .read, depth: depth, seconds: seconds)
        let r = bench.run(d)
        if let failure = d.failure { _ = try runVerified { () throws(VerifiedBlockError) in throw failure } }
        let op = write ? "write" : "read"
        func line(_ name: String, _ p: VerifiedBench.Phase) -> String {
            "  \(name) \(p.requests) requests, \(format(p.requestsPerSecond, 0)) IOPS, \(format(p.microsecondsPerRequest, 2)) us/request"
        }
        print("verified bench: random 4 KiB \(op)s, depth \(bench.depth), \(format(seconds, 1)) s")
        print(line("plain:     ", r.plain))
        print(line("verified:  ", r.verified))
        print(line("AEAD floor:", r.aeadFloor) + " (AES-256-GCM \(write ? "seal" : "open") of 4 KiB, one core)")
        let t = r.verifiedSplit
        let per = { (ns: UInt64) in format(Double(ns) / Double(max(1, t.blocks)) / 1000, 2) }
        print(
            "  verified, per block: \(write ? "seal" : "open and check") \(per(t.cryptoNanoseconds)) us, "
                + "transfer \(per(t.transferNanoseconds)) us\(write ? ", tree \(per(t.treeNanoseconds)) us" : "")")
        print("  ratio verified / (plain + AEAD floor) = \(format(r.ratio, 3)) (target <= 1.25)")
    }
}

/// `ringfence seal IMAGE`: builds the verity hash tree into the image and prints the root.
struct SealCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "seal",
        abstract: "Append a verity hash tree to a disk image and print its root hash.",
        discussion: """
            The image is padded to whole 4 KiB blocks and the SHA-256 hash tree and a trailer \
            are appended in place. Serve the image (serve-blk, serve-xen-blk) and read it with \
            `ringfence blk --socket S --root-hash HEX read|verify|info`: every block is checked \
            against the root hash, no key needed.
            """)

    @Argument(help: "The image file to seal (changed in place).")
    var image: String

    func run() throws {
        let (root, layout) = try runVerified { () throws(VerifiedBlockError) in try VerityDevice.seal(path: image) }
        FileHandle.standardError.write(
            Data("sealed \(image): \(layout.dataBlocks) data blocks, \(layout.totalBytes) bytes with the tree\n".utf8))
        print(hexString(root))
    }
}
