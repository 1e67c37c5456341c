import Adversary
import ArgumentParser
import Foundation
import SharedMemory

#if canImport(Glibc)
import Glibc
#endif

/// `ringfence demo`: the whole story on an embedded default, no peers needed: our device
/// serves a temporary image, our driver uses it, then the adversary catalogue is aimed at
/// our driver and the report printed.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Show RingFence working on an embedded default device, no set-up needed.",
        discussion: """
            Starts `ringfence serve-blk` on a temporary 64 MiB image (a child process), runs the \
            hardened driver against it (info, verify, a short bench), shows each payload lie passing \
            the plain driver and caught by the verified layer (VerifiedBlock), then audits the driver \
            against every attack of the catalogue (each in a fresh child process) and prints the table.
            """)

    @Option(help: "Seconds of the benchmark.") var seconds: Double = 3
    @Flag(name: .customLong("skip-audit"), help: "Stop after the benchmark.") var skipAudit = false

    func run() throws {
        let start = monotonicNanoseconds()
        let dir = NSTemporaryDirectory() + "rf-demo-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let image = dir + "/disk.img"
        let socket = dir + "/blk.sock"
        guard FileManager.default.createFile(atPath: image, contents: nil), truncate(image, 64 << 20) == 0 else {
            throw ValidationError("cannot create \(image)")
        }
        print("== 1. device: ringfence serve-blk --socket \(socket) --image <64 MiB temp file> (child process)")
        let server = try ChildProcess(
            executable: currentExecutablePath(),
            arguments: ["serve-blk", "--socket", socket, "--image", image, "--log-level", "error"])
        defer {
            _ = kill(server.pid, SIGTERM)
            if server.wait(until: .after(seconds: 3)) == nil { server.kill() }
        }
        let end = Deadline.after(seconds: 10)
        while !FileManager.default.fileExists(atPath: socket) {
            if end.hasPassed || server.wait(until: .after(seconds: 0)) != nil {
                throw ValidationError("serve-blk did not start")
            }
            usleep(10_000)
        }
        for (title, arguments) in [
            ("2. driver: blk info", ["info"]),
            ("3. driver: blk verify (write a seeded 4 MiB pattern, read it back)", ["verify", "--size", "4M"]),
            (
                "4. driver: blk bench (4 KiB random reads, queue depth 8)",
                ["bench", "--runtime", "\(seconds)", "--iodepth", "8"]
            ),
        ] {
            print("\n== \(title)")
            var command = try RingFence.parseAsRoot(["blk", "--socket", socket] + arguments)
            try command.run()
        }
        print(
            "\n== 4b. payload lies: a back-end returning wrong bytes, through the plain driver and the verified layer")
        if !demoPayloadLies(directory: dir) { throw ExitCode(1) }
        if skipAudit { return }
        print("\n== 5. audit: every attack of the catalogue against our driver, each in a fresh child process")
        let report = Auditor(after: nil, imageDir: nil).runSelf(Catalogue.all, deadline: 25)
        print(report.markdown)
        let total = Double(monotonicNanoseconds() &- start) / 1e9
        let failed = report.records.filter { $0.asExpected != true && $0.outcome != .notApplicable }
        print(
            "demo: done in " + format(total, 1) + " s; "
                + (failed.isEmpty
                    ? "every attack was contained as the catalogue expects."
                    : "\(failed.count) attack(s) ended otherwise than expected."))
        if !failed.isEmpty { throw ExitCode(1) }
    }
}
