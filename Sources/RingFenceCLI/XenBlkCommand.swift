import Adversary
import ArgumentParser
import BlockBench
import BlockImage
import Foundation
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
        discussion: """
            Listens on a Unix socket; each connection runs the xenstore-like handshake, maps \
            the frontend's grant table and frames (sealed memfds), and serves blkif requests \
            until the frontend closes. --attack makes this backend misbehave (for audits).
            """)

    @Option(help: "Unix socket to listen on.")
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

    func run() throws {
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

    /// Serves one frontend; its counts reach `metrics` when it ends (requests, rejections by
    /// rule, the violation that dropped it, or the refusal of its handshake).
    func serveOne(
        _ channel: UnixChannel, storage: any BlockStorage, attack: XenBackendAttack?, metrics: ServerMetrics,
        number: Int
    ) {
        metrics.connected(number)
        defer { metrics.disconnected() }
        do {
            let connection = try XenBlkBackendConnection.accept(
                channel: channel, storage: storage, hooks: attack.map(XenBackendAdversary.init))
            let end = connection.run()
            let b = connection.backend
            metrics.add(
                BlockDeviceStatistics(
                    requests: b.servedRequests, failed: b.rejectedRequests,
                    violations: Dictionary(uniqueKeysWithValues: b.rejectionsByRule.map { ($0.key.rawValue, $0.value) })
                ),
                connection: number)
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

/// `ringfence xen-blk`: the hardened blkif frontend, mirroring `blk`.
struct XenBlkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xen-blk",
        abstract: "Talk to a Xen-style blkif backend through the hardened frontend.",
        discussion: """
            Actions: info (capacity and features), read (hex dump of --count sectors at \
            --sector), write (a --seed pattern), verify (write, read back, compare), bench \
            (--depth requests of 4 KiB for --seconds), audit (send each malformed request of \
            --attack, or all, each on a fresh connection, and report how the backend \
            reacted). Exit status 1 on a mismatch or a failed audit; a misbehaving backend \
            disables the device with a typed violation.
            """)

    enum Action: String, ExpressibleByArgument, CaseIterable { case info, read, write, verify, bench, audit, format }

    @Option(help: "Unix socket of the backend.")
    var socket: String

    @Argument(help: "info | read | write | verify | bench | audit | format (verified mode)")
    var action: Action

    @OptionGroup(title: "Verified payload (docs/verified-block.md)")
    var verified: VerifiedOptions

    @Option(help: "First 512-byte sector.")
    var sector: UInt64 = 0

    @Option(help: "Sectors (read/write/verify; at most 88 per request).")
    var count: Int = 8

    @Option(help: "Pattern seed for write/verify.")
    var seed: UInt8 = 1

    @Option(help: "Seconds (bench).")
    var seconds: Double = 3

    @Option(help: "Requests in flight (bench, at most 32).")
    var depth: Int = 16

    @Flag(help: "Benchmark writes instead of reads.")
    var writes = false

    @Option(
        help: ArgumentHelp(
            "Deadline in seconds for each operation as a whole: connecting (with the handshake), each request, "
                + "closing."))
    var timeout: Double = 5

    @Option(help: "audit: one of \(XenFrontendAttack.allCases.map(\.rawValue).joined(separator: ", ")) (default: all).")
    var attack: String?

    func validate() throws {
        guard count >= 1, count <= BlkifLayout.maxSegments * BlkifLayout.sectorsPerPage else {
            throw ValidationError("--count must be in 1...88")
        }
        guard depth >= 1, depth <= 32 else { throw ValidationError("--depth must be in 1...32") }
        guard seconds > 0, seconds <= 3600 else { throw ValidationError("--seconds must be in (0, 3600]") }
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be in (0, 3600]") }
        if let attack, XenFrontendAttack(rawValue: attack) == nil { throw ValidationError("unknown attack \(attack)") }
    }

    func run() throws {
        if action == .audit { return try audit() }
        let handshake = Deadline.after(seconds: timeout)
        let channel = try UnixChannel.connect(path: socket, until: handshake)
        let device = try XenBlkFrontendDevice.connect(channel: channel, until: handshake)
        device.timeout = timeout
        defer { device.disconnect() }
        if verified.enabled || action == .format { return try runInVerifiedMode(device) }
        let info = device.info
        let bytes = count * BlkifLayout.sectorSize
        switch action {
        case .info:
            print(
                "sectors \(info.sectors) (\(info.sectors / 2048) MiB), sector-size \(info.sectorSize), "
                    + "flush \(info.flushCache), discard \(info.discard), \(info.readOnly ? "read-only" : "read-write"), "
                    + "ring \(device.front.ringSize) slots")
        case .read:
            var data = [UInt8](repeating: 0, count: bytes)
            try data.withUnsafeMutableBytes { try device.read(sector: sector, into: $0) }
            printHex(data, base: sector * 512)
        case .write:
            let data = pattern(bytes)
            try data.withUnsafeBytes { try device.write(sector: sector, from: $0) }
            print("wrote \(bytes) bytes at sector \(sector)")
        case .verify:
            let data = pattern(bytes)
            try data.withUnsafeBytes { try device.write(sector: sector, from: $0) }
            if info.flushCache { try device.flush() }
            var back = [UInt8](repeating: 0, count: bytes)
            try back.withUnsafeMutableBytes { try device.read(sector: sector, into: $0) }
            guard back == data else {
                print("verify: MISMATCH at sector \(sector)")
                throw ExitCode(1)
            }
            print("verify: \(bytes) bytes at sector \(sector) read back intact")
        case .bench:
            let blockSectors = UInt64(4096 / BlkifLayout.sectorSize)
            let bench = BlockBench(
                pattern: writes ? .write : .read, blockSize: 4096, depth: depth, seconds: seconds,
                blocks: info.sectors / blockSectors)
            let r = bench.run(device)
            if let error = r.firstError, r.errors == 0 { throw error }
            print(
                "xen-blk bench: \(writes ? "write" : "read") 4 KiB, depth \(depth): \(r.requests) requests in "
                    + "\(format(r.seconds, 2)) s = \(format(r.requestsPerSecond, 0)) IOPS, "
                    + "\(format(r.mebibytesPerSecond, 1)) MiB/s, \(r.errors) errors, "
                    + "\(device.events.spuriousEvents) spurious events")
            if r.errors > 0 { throw ExitCode(1) }
        case .audit, .format:
            break  // audit: handled before connecting; format: verified mode
        }
    }

    /// Verified mode: the same actions through `VerifiedBlock` (blocks of 4 KiB: --sector
    /// is rounded down to a block, --count sectors give the blocks).
    func runInVerifiedMode(_ device: XenBlkFrontendDevice) throws {
        guard verified.enabled else { throw ValidationError("format needs --key FILE and --anchor FILE") }
        let disk = try verified.open(device, format: action == .format)
        defer { disk.close() }
        let block = sector / 8
        let blocks = max(1, count / 8)
        switch action {
        case .format:
            print("formatted: \(disk.blocks) verified blocks of 4096 bytes")
            disk.info()
        case .info: disk.info()
        case .read:
            let data = try runVerified { () throws(VerifiedBlockError) in try disk.read(block: block, count: blocks) }
            printHex(data, base: block * 4096)
        case .write: try disk.write(block: block, data: pattern(blocks * 4096))
        case .verify: try disk.verify(blocks: blocks, seed: UInt64(seed))
        case .bench: try disk.bench(write: writes, depth: depth, seconds: seconds)
        case .audit: break
        }
    }

    /// Each frontend attack on a fresh connection, judged by `Auditor`: a bad request must
    /// be refused and the backend must keep serving; a corrupt ring must get the
    /// connection dropped.
    func audit() throws {
        let attacks = attack.flatMap(XenFrontendAttack.init(rawValue:)).map { [$0] } ?? XenFrontendAttack.allCases
        let records = try Auditor.auditXenBackend(socket: socket, attacks: attacks, timeout: timeout) { print($0) }
        if records.contains(where: { !$0.isSafe }) { throw ExitCode(1) }
    }

    func pattern(_ n: Int) -> [UInt8] {
        (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 131 &+ Int(seed) &* 7 &+ $0 >> 9) }
    }

    func printHex(_ data: [UInt8], base: UInt64) {
        let hex = Array("0123456789abcdef")
        var line = 0
        while line < data.count {
            var s = String(base + UInt64(line), radix: 16)
            s = String(repeating: "0", count: max(0, 8 - s.count)) + s + " "
            for b in data[line..<min(line + 16, data.count)] {
                s.append(" ")
                s.append(hex[Int(b >> 4)])
                s.append(hex[Int(b & 15)])
            }
            print(s)
            line += 16
        }
    }
}
