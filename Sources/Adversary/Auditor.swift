#if canImport(Glibc)
import Glibc
#endif
import Foundation
public import SharedMemory
import Virtqueue

/// Why an audit could not run at all (a target's failure is a report row, not this).
public struct AuditError: Error, CustomStringConvertible {
    /// What went wrong.
    public let description: String
    init(_ description: String) { self.description = description }
}

/// Runs attacks in child processes (a crash or hang of the target must not end the audit):
/// what `ringfence audit` and `ringfence demo` call.
public struct Auditor: Sendable {
    /// `--attack-after` for every attack (nil: each attack's default).
    public let after: Int?
    /// Guest image folder for `linux-guest` (nil: run-guest.sh's default).
    public let imageDir: String?
    /// The `ringfence` executable to spawn (`audit-one`, `serve-blk --attack`).
    public let executable: String
    /// Your own kernel for `linux-guest` (nil: the Debian kernel scripts/guest builds).
    public let guestKernel: GuestKernelSource?

    /// An auditor that spawns `executable` for every attack.
    public init(
        after: Int? = nil, imageDir: String? = nil, guestKernel: GuestKernelSource? = nil,
        executable: String = currentExecutablePath()
    ) {
        self.after = after
        self.imageDir = imageDir
        self.guestKernel = guestKernel
        self.executable = executable
    }

    func progress(_ k: Int, _ n: Int, _ name: String, _ start: UInt64) {
        let elapsed = String(format: "%.1f", Double(monotonicNanoseconds() &- start) / 1e9)
        let line =
            k > n
            ? "audit: \(n) attacks done in \(elapsed) s\n"
            : "audit: attack \(k) of \(n) (\(name)), \(elapsed) s elapsed"
        FileHandle.standardError.write(Data(("\r\u{1b}[2K" + line).utf8))
    }

    func scratch(_ name: String) -> String {
        let dir = NSTemporaryDirectory() + "rf-audit-\(getpid())-\(name)"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    func afterArguments(_ a: Attack) -> [String] { ["--attack-after", "\(after ?? a.defaultAfter)"] }

    // MARK: self

    /// Runs `attacks` against RingFence's own driver, each in a fresh child process, `deadline` seconds each.
    public func runSelf(_ attacks: [Attack], deadline: Double) -> AuditReport {
        let start = monotonicNanoseconds()
        var records: [AuditRecord] = []
        for (i, a) in attacks.enumerated() {
            progress(i + 1, attacks.count, a.name, start)
            records.append(runSelfOne(a, deadline: deadline))
        }
        progress(attacks.count + 1, attacks.count, "done", start)
        return AuditReport(
            target: "ringfence VirtioBlock driver", records: records,
            seconds: Double(monotonicNanoseconds() &- start) / 1e9)
    }

    func runSelfOne(_ a: Attack, deadline: Double) -> AuditRecord {
        let dir = scratch(a.name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let resultPath = dir + "/result.json"
        let t0 = monotonicNanoseconds()
        let child: ChildProcess
        do {
            child = try ChildProcess(
                executable: executable,
                arguments: ["audit-one", "--attack", a.name, "--dir", dir, "--result", resultPath] + afterArguments(a))
        } catch {
            return AuditRecord(attack: a, outcome: .notRun, seconds: 0, evidence: "\(error)")
        }
        let seconds = { Double(monotonicNanoseconds() &- t0) / 1e9 }
        guard let exit = child.wait(until: .after(seconds: deadline)) else {
            child.kill()
            return AuditRecord(
                attack: a, outcome: .hung, seconds: seconds(), evidence: "no result within \(deadline) s; killed",
                asExpected: false)
        }
        if case .signaled(let s) = exit {
            return AuditRecord(
                attack: a, outcome: .crashed, seconds: seconds(), evidence: "killed by signal \(s)", asExpected: false)
        }
        guard let data = FileManager.default.contents(atPath: resultPath),
            let result = try? JSONDecoder().decode(ProbeResult.self, from: data)
        else {
            return AuditRecord(
                attack: a, outcome: .notRun, seconds: seconds(), evidence: "child \(exit), no result", asExpected: false
            )
        }
        return result.record(for: a)
    }

    // MARK: command

    /// Runs `attacks` against `command` (with `{socket}` replaced by the attacked device's socket), `deadline` seconds each.
    public func runCommand(_ attacks: [Attack], command: [String], deadline: Double) -> AuditReport {
        let start = monotonicNanoseconds()
        var records: [AuditRecord] = []
        for (i, a) in attacks.enumerated() {
            progress(i + 1, attacks.count, a.name, start)
            let dir = scratch(a.name)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            guard let server = startServer(a, dir: dir, imageSize: 64 << 20) else {
                records.append(
                    AuditRecord(attack: a, outcome: .notRun, seconds: 0, evidence: "serve-blk did not start"))
                continue
            }
            defer {
                if records.last?.outcome != .notRun, let skipped = notApplicable(a, dir: dir) {
                    records[records.count - 1] = skipped
                }
            }
            let socket = dir + "/s.sock"
            var arguments = command.map { $0.replacingOccurrences(of: "{socket}", with: socket) }
            if !command.contains(where: { $0.contains("{socket}") }) { arguments.append(socket) }
            let t0 = monotonicNanoseconds()
            let seconds = { Double(monotonicNanoseconds() &- t0) / 1e9 }
            let executable = arguments[0].contains("/") ? arguments[0] : which(arguments[0]) ?? arguments[0]
            guard let child = try? ChildProcess(executable: executable, arguments: Array(arguments.dropFirst())) else {
                records.append(
                    AuditRecord(attack: a, outcome: .notRun, seconds: 0, evidence: "cannot start \(arguments[0])"))
                stopServer(server)
                continue
            }
            switch child.wait(until: .after(seconds: deadline)) {
            case nil:
                child.kill()
                records.append(
                    AuditRecord(
                        attack: a, outcome: .hung, seconds: seconds(),
                        evidence: "still running after \(deadline) s; killed"))
            case .signaled(let s)?:
                records.append(
                    AuditRecord(attack: a, outcome: .crashed, seconds: seconds(), evidence: "killed by signal \(s)"))
            case .exited(let c)?:
                records.append(
                    AuditRecord(
                        attack: a, outcome: c == 0 ? .unaffected : .contained, seconds: seconds(),
                        evidence: "exit status \(c)"))
            }
            stopServer(server)
        }
        progress(attacks.count + 1, attacks.count, "done", start)
        return AuditReport(
            target: command.joined(separator: " "), records: records,
            seconds: Double(monotonicNanoseconds() &- start) / 1e9)
    }

    func which(_ name: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// A packed-ring attack whose driver acked the split ring (or never acked features):
    /// the record that says so, from the file `serve-blk --negotiation-file` wrote.
    func notApplicable(_ a: Attack, dir: String) -> AuditRecord? {
        guard a.ring == .packed else { return nil }
        let acked = (try? String(contentsOfFile: dir + "/negotiated", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        guard acked != RingFormat.packed.rawValue else { return nil }
        return AuditRecord(
            attack: a, outcome: .notApplicable, seconds: 0,
            evidence: "not applicable: the driver acked the \(acked ?? "no") ring, not VIRTIO_F_RING_PACKED")
    }

    /// `ringfence serve-blk --attack NAME` on a fresh image, as a child; waits for the socket.
    func startServer(_ a: Attack, dir: String, imageSize: Int, dump: String? = nil) -> ChildProcess? {
        let image = dir + "/disk.img"
        guard FileManager.default.createFile(atPath: image, contents: nil), truncate(image, off_t(imageSize)) == 0
        else { return nil }
        var arguments =
            ["serve-blk", "--socket", dir + "/s.sock", "--image", image, "--log-level", "error", "--attack", a.name]
            + afterArguments(a) + ["--negotiation-file", dir + "/negotiated"]
        if let dump { arguments += ["--dump", dump] }
        guard let child = try? ChildProcess(executable: executable, arguments: arguments) else { return nil }
        let end = Deadline.after(seconds: 10)
        while !FileManager.default.fileExists(atPath: dir + "/s.sock") {
            if end.hasPassed || child.wait(until: .after(seconds: 0)) != nil {
                child.kill()
                return nil
            }
            usleep(10_000)
        }
        return child
    }

    func stopServer(_ child: ChildProcess) {
        _ = Glibc.kill(child.pid, SIGTERM)
        if child.wait(until: .after(seconds: 3)) == nil { child.kill() }
    }

    // MARK: linux-guest

    /// Runs `attacks` against Linux's virtio_blk in the test guest under QEMU (`scripts/guest`), `deadline` seconds each.
    public func runLinuxGuest(_ attacks: [Attack], deadline: Double) throws(AuditError) -> AuditReport {
        let repo = repositoryRoot()
        let runGuest = repo + "/scripts/guest/run-guest.sh"
        guard FileManager.default.fileExists(atPath: runGuest) else {
            throw AuditError("scripts/guest/run-guest.sh not found (run from the repository)")
        }
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-system-x86_64") else {
            throw AuditError("qemu-system-x86_64 is not installed (scripts/guest/build-image.sh installs it)")
        }
        let images =
            imageDir ?? guestKernel.map { repo + "/.build-guest-kernels/" + $0.imageName }
            ?? ProcessInfo.processInfo.environment["RINGFENCE_GUEST_DIR"] ?? repo + "/.build-guest"
        if let guestKernel { try buildImage(guestKernel, into: images, repo: repo) }
        let start = monotonicNanoseconds()
        var records: [AuditRecord] = []
        var booted: String?
        for (i, a) in attacks.enumerated() {
            progress(i + 1, attacks.count, a.name, start)
            let (record, release) = runGuestOne(a, runGuest: runGuest, images: images, deadline: deadline)
            records.append(record)
            booted = booted ?? release
        }
        progress(attacks.count + 1, attacks.count, "done", start)
        var kernel = (try? String(contentsOfFile: images + "/kernel.txt", encoding: .utf8))
            .flatMap(GuestKernel.init(kernelTxt:))
        kernel?.booted = booted
        let name = kernel.map { "Linux \($0.release) virtio_blk (QEMU TCG guest)" }
        return AuditReport(
            target: name ?? "Linux 6.1 virtio_blk (Debian kernel, QEMU TCG guest)", records: records,
            seconds: Double(monotonicNanoseconds() &- start) / 1e9, kernel: kernel)
    }

    /// scripts/guest/build-image.sh around your own kernel (cached by the script).
    func buildImage(_ source: GuestKernelSource, into dir: String, repo: String) throws(AuditError) {
        let log = NSTemporaryDirectory() + "rf-audit-build-\(getpid()).log"
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        defer { try? FileManager.default.removeItem(atPath: log) }
        FileHandle.standardError.write(Data("audit: building the guest image in \(dir)\n".utf8))
        let status = runToCompletion(
            ["/bin/bash", repo + "/scripts/guest/build-image.sh"] + source.buildArguments + [dir], output: log,
            deadline: 600)
        guard status == 0 else {
            let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            let why = text.split(whereSeparator: \.isNewline).last.map(String.init) ?? "no output"
            throw AuditError("the guest image for your kernel could not be built: \(why)")
        }
    }

    func runGuestOne(_ a: Attack, runGuest: String, images: String, deadline: Double) -> (AuditRecord, String?) {
        let dir = scratch(a.name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let dump = a.name == "leak-probe" ? dir + "/dump.bin" : nil
        guard let server = startServer(a, dir: dir, imageSize: 64 << 20, dump: dump) else {
            return (AuditRecord(attack: a, outcome: .notRun, seconds: 0, evidence: "serve-blk did not start"), nil)
        }
        defer { stopServer(server) }
        var canaryBytes = [UInt8](repeating: 0, count: 12)
        for i in canaryBytes.indices { canaryBytes[i] = UInt8.random(in: 0...255) }
        let canary = "RF-CANARY-" + canaryBytes.map { String(format: "%02x", $0) }.joined()
        let script = dir + "/io.sh"
        let console = dir + "/console.txt"
        _ = FileManager.default.createFile(atPath: script, contents: Data(GuestConsole.ioScript(canary: canary).utf8))
        // Hung tasks reported after 5 s (the module load itself may block, before the script).
        var arguments = [
            runGuest, "--script", script, "--blk-socket", dir + "/s.sock", "--timeout", "\(Int(deadline))",
            "--console", console, "--quiet", "--append", "sysctl.kernel.hung_task_timeout_secs=5",
            "--image-dir", images,
        ]
        // Packed attacks need the guest's vhost-user-blk-pci device to offer the packed ring.
        if a.ring == .packed { arguments += ["--packed", "on"] }
        let t0 = monotonicNanoseconds()
        let output = dir + "/run-guest.out"
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        let status = runToCompletion(
            ["/bin/bash"] + arguments, output: output, deadline: deadline + 20, console: console)
        let seconds = Double(monotonicNanoseconds() &- t0) / 1e9
        let text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        let hostLog = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        var (outcome, evidence) = GuestConsole.classify(
            console: text.isEmpty ? hostLog : text, exitStatus: status ?? -1, timedOut: status == nil || status == 124)
        let booted = GuestConsole.bootedRelease(console: text)
        if let skipped = notApplicable(a, dir: dir) { return (skipped, booted) }
        if let dump, let bytes = FileManager.default.contents(atPath: dump) {
            let found = DriverProbe.contains([UInt8](bytes), Array(canary.utf8))
            evidence += "; \(bytes.count) bytes of shared memory dumped, canary " + (found ? "FOUND" : "not found")
            if found { outcome = .leakedCanary }
        }
        return (AuditRecord(attack: a, outcome: outcome, seconds: seconds, evidence: evidence), booted)
    }

    /// Runs a command with stdout+stderr into `output`; nil if it outlived `deadline`.
    /// A console showing a hung task or a panic ends the boot early (SIGTERM: run-guest.sh
    /// then stops QEMU), 2 s after the first such line so its context is logged too.
    func runToCompletion(_ arguments: [String], output: String, deadline: Double, console: String? = nil) -> Int32? {
        let fd = open(output, O_WRONLY | O_TRUNC)
        defer { if fd >= 0 { close(fd) } }
        guard fd >= 0,
            let child = try? ChildProcess(executable: arguments[0], arguments: Array(arguments.dropFirst()), stdout: fd)
        else {
            return -1
        }
        let end = Deadline.after(seconds: deadline)
        var verdictSince: Deadline?
        while true {
            switch child.wait(until: .after(seconds: 0.5)) {
            case .exited(let c)?: return c
            case .signaled?: return -1
            case nil: break
            }
            if end.hasPassed {
                child.kill()
                return nil
            }
            if let console, verdictSince == nil, let text = try? String(contentsOfFile: console, encoding: .utf8),
                text.contains("blocked for more than") || text.contains("Kernel panic")
            {
                verdictSince = .after(seconds: 2)
            }
            if let v = verdictSince, v.hasPassed {
                _ = Glibc.kill(child.pid, SIGTERM)
                return child.wait(until: .after(seconds: 10)) == nil ? (child.kill() != nil ? -1 : -1) : 143
            }
        }
    }

    /// The repository: the current directory if it has scripts/guest, else up from the binary.
    func repositoryRoot() -> String {
        let cwd = FileManager.default.currentDirectoryPath
        if FileManager.default.fileExists(atPath: cwd + "/scripts/guest/run-guest.sh") { return cwd }
        var url = URL(fileURLWithPath: executable)
        for _ in 0..<6 {
            url.deleteLastPathComponent()
            if FileManager.default.fileExists(atPath: url.path + "/scripts/guest/run-guest.sh") { return url.path }
        }
        return cwd
    }
}
