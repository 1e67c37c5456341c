import Foundation

/// DPDK's testpmd (Debian dpdk-dev 22.11), started and stopped by a test: either the vhost
/// back-end (`net_vhost`, server socket) our driver connects to, or DPDK's virtio_user
/// driver connecting to our device. Forwarding starts at once; a newline on stdin stops it
/// (testpmd's own "Press enter to exit"), and its statistics are parsed from stdout.
final class Testpmd: @unchecked Sendable {
    static let path = "/usr/bin/dpdk-testpmd"
    static var installed: Bool { FileManager.default.isExecutableFile(atPath: path) }

    /// DPDK's --no-huge memfds cannot be sealed; our devices refuse unsealed memory
    /// (design §4.1), so DPDK's driver runs with scripts/dpdk/seal-memfd.c preloaded.
    static let sealShim: String? = {
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../scripts/dpdk/seal-memfd.c").standardized.path
        let output = NSTemporaryDirectory() + "ringfence-seal-memfd-\(getpid()).so"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/cc")
        p.arguments = ["-shared", "-fPIC", "-O2", "-o", output, source, "-ldl"]
        guard (try? p.run()) != nil else { return nil }
        p.waitUntilExit()
        return p.terminationStatus == 0 ? output : nil
    }()

    static let stdbuf = "/usr/libexec/coreutils/libstdbuf.so"

    let process = Process()
    let input = Pipe()
    let outputPath: String
    private(set) var output = ""

    /// `vdev` is the --vdev argument; `mode` the forwarding mode.
    init(vdev: String, mode: String, extra: [String] = [], preloadSealShim: Bool = false) throws {
        let prefix = "rf\(getpid())x\(UInt32.random(in: 0...UInt32.max))"
        outputPath = NSTemporaryDirectory() + "\(prefix).log"
        _ = FileManager.default.createFile(atPath: outputPath, contents: nil)
        process.executableURL = URL(fileURLWithPath: Self.path)
        process.arguments =
            [
                "-l", "0-1", "--no-huge", "--no-pci", "-m", "256", "--file-prefix=\(prefix)", "--vdev", vdev, "--",
                "--nb-cores=1", "--total-num-mbufs=8192", "--forward-mode=\(mode)", "-a",
            ] + extra
        var environment = ProcessInfo.processInfo.environment
        // Line-buffered stdout (coreutils' stdbuf library), so the test sees "Press enter to
        // exit" as soon as forwarding runs: testpmd drops what arrived before that.
        var preload: [String] = []
        if FileManager.default.fileExists(atPath: Self.stdbuf) {
            preload.append(Self.stdbuf)
            environment["_STDBUF_O"] = "L"
        }
        if preloadSealShim, let shim = Self.sealShim { preload.append(shim) }
        if !preload.isEmpty { environment["LD_PRELOAD"] = preload.joined(separator: ":") }
        process.environment = environment
        process.standardInput = input
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: outputPath))
        process.standardOutput = out
        process.standardError = out
        try process.run()
    }

    var log: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }

    /// Waits until `text` appears in testpmd's output (or it exits).
    func waitFor(_ text: String, seconds: Double = 15) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if log.contains(text) { return true }
            if !process.isRunning { return log.contains(text) }
            usleep(20_000)
        }
        return false
    }

    /// Stops forwarding (newline on stdin), waits for the exit; returns the output.
    @discardableResult
    func stop() -> String {
        if process.isRunning {
            try? input.fileHandleForWriting.write(contentsOf: Data("\n".utf8))
            let deadline = Date().addingTimeInterval(10)
            while process.isRunning && Date() < deadline { usleep(20_000) }
            if process.isRunning {
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
            }
        }
        output = log
        try? FileManager.default.removeItem(atPath: outputPath)
        return output
    }

    /// The accumulated RX-packets / TX-packets of the last statistics block.
    static func counters(_ output: String) -> (rx: Int, tx: Int)? {
        guard let block = output.components(separatedBy: "Accumulated forward statistics").last,
            output.contains("Accumulated forward statistics")
        else { return nil }
        func value(_ key: String) -> Int? {
            guard let r = block.range(of: key) else { return nil }
            let digits = block[r.upperBound...].drop { $0 == " " }.prefix { $0.isNumber }
            return Int(digits)
        }
        guard let rx = value("RX-packets:"), let tx = value("TX-packets:") else { return nil }
        return (rx, tx)
    }

    /// Per forwarding stream (testpmd prints them when a port has more than one queue):
    /// RX queue -> (RX-packets, TX-packets) of "Forward Stats for RX Port= P/Queue= Q".
    static func streamCounters(_ output: String) -> [Int: (rx: Int, tx: Int)] {
        var result: [Int: (rx: Int, tx: Int)] = [:]
        let marker = "Forward Stats for RX Port= "
        for chunk in output.components(separatedBy: marker).dropFirst() {
            guard let q = chunk.range(of: "/Queue= ") else { continue }
            let queue = Int(chunk[q.upperBound...].drop { $0 == " " }.prefix { $0.isNumber })
            func value(_ key: String) -> Int? {
                guard let r = chunk.range(of: key) else { return nil }
                return Int(chunk[r.upperBound...].drop { $0 == " " }.prefix { $0.isNumber })
            }
            if let queue, let rx = value("RX-packets:"), let tx = value("TX-packets:") { result[queue] = (rx, tx) }
        }
        return result
    }

    deinit { stop() }
}
