#if canImport(Glibc)
import Glibc
#endif
import Foundation
public import SharedMemory
import VhostUser
public import VirtioFS

/// What one fs attack did to our driver (`FSProbe.run`), for the audit.
public struct FSProbeResult: Sendable, Codable, Equatable {
    /// The case name of the first error (`unaffected` when none).
    public var signature: String
    public var evidence: String
    /// The driver reported itself broken afterwards.
    public var broken: Bool
    /// A healthy device in the same process was served afterwards (§1.5).
    public var neighbourOK: Bool
    public var seconds: Double
}

/// Our virtio-fs driver against one fs attack, in this process: the attacked device and
/// a healthy one are served here by the real back-end; the probe does what a user does
/// first (stat, write, read, list, forget, stat again).
public enum FSProbe {
    final class Bed: @unchecked Sendable {
        let socket: String
        let backend: Backend
        let finished = DispatchSemaphore(value: 0)

        init(directory: String, attack: FSAttack?) throws {
            try FileManager.default.createDirectory(atPath: directory + "/root", withIntermediateDirectories: true)
            for name in ["a", "b", "c"] {
                try Data(name.utf8).write(to: URL(fileURLWithPath: "\(directory)/root/\(name)"))
            }
            socket = directory + "/fs.sock"
            var options = VirtioFSDeviceOptions(directory: directory + "/root")
            options.tag = "rfs"
            let device = FSAdversaryDevice(inner: try VirtioFSDevice(options: options), attack: attack)
            var configuration = Backend.Configuration()
            configuration.pollInterval = 0.05
            configuration.queueTiming.idleTick = 0.2
            backend = Backend(device: device, configuration: configuration)
            let listener = try UnixListener(path: socket)
            let backend = self.backend
            let finished = self.finished
            Thread.detachNewThread {
                try? backend.run(listener: listener)
                finished.signal()
            }
        }

        func stop() {
            backend.stop()
            finished.wait()
        }
    }

    public static func caseName(_ e: FSError?) -> String {
        switch e {
        case nil: return "unaffected"
        case .errno?: return "errno"
        case .timeout?: return "timeout"
        case .violation(let v)?: return Mirror(reflecting: v).children.first?.label ?? "\(v)"
        case .deviceViolation(let v)?: return Mirror(reflecting: v).children.first?.label ?? "\(v)"
        case let other?: return "\(other)"
        }
    }

    /// The probe against the socket: the first error and whether the driver is broken.
    public static func probe(_ socket: String, requestTimeout: Double = 2) -> (error: FSError?, broken: Bool) {
        var o = VirtioFSDriver.Options()
        o.requestTimeout = requestTimeout
        o.controlTimeout = 5
        let fs: VirtioFSDriver
        do throws(FSError) {
            fs = try VirtioFSDriver.connect(socket: socket, options: o)
        } catch {
            return (error, true)
        }
        defer { fs.close() }
        do throws(FSError) {
            _ = try fs.stat("/")
            try fs.writeFile("probe.txt", bytes: Array(repeating: 0x5a, count: 100))
            _ = try fs.stat("probe.txt")
            _ = try fs.readFile("probe.txt")
            _ = try fs.listDirectory("/")
            try fs.flushForgets()
            _ = try fs.stat("a")
            try fs.flushForgets()
        } catch {
            return (error, fs.isBroken)
        }
        return (nil, fs.isBroken)
    }

    public static func run(_ attack: FSAttack, directory: String) -> FSProbeResult {
        let t0 = monotonicNanoseconds()
        guard let bed = try? Bed(directory: directory + "/attacked", attack: attack),
            let healthy = try? Bed(directory: directory + "/healthy", attack: nil)
        else {
            return FSProbeResult(
                signature: "not run", evidence: "test bed did not start", broken: false, neighbourOK: false, seconds: 0)
        }
        defer {
            bed.stop()
            healthy.stop()
        }
        let (error, broken) = probe(bed.socket)
        let seconds = Double(monotonicNanoseconds() &- t0) / 1e9
        let (healthyError, _) = probe(healthy.socket)
        return FSProbeResult(
            signature: caseName(error), evidence: error.map { "\($0)" } ?? "no error", broken: broken,
            neighbourOK: healthyError == nil, seconds: seconds)
    }
}

extension AuditRecord {
    init(
        fs attack: FSAttack, outcome: Outcome, seconds: Double, evidence: String, asExpected: Bool? = nil,
        signature: String? = nil
    ) {
        self.attack = attack.name
        self.group = "fs"
        self.rule = attack.rule.rawValue
        self.outcome = outcome
        self.seconds = seconds
        self.evidence = evidence
        self.asExpected = asExpected
        self.signature = signature
    }
}

/// `ringfence audit --device fs`: the fs catalogue against our driver (each attack in a
/// fresh child process) or against Linux's virtiofs in a QEMU TCG guest.
public struct FSAuditor: Sendable {
    public let executable: String
    public let imageDir: String?

    public init(imageDir: String? = nil, executable: String = currentExecutablePath()) {
        self.imageDir = imageDir
        self.executable = executable
    }

    func progress(_ k: Int, _ n: Int, _ name: String) {
        FileHandle.standardError.write(Data("[\(min(k, n))/\(n)] \(name)\n".utf8))
    }

    func scratch(_ name: String) -> String {
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        let dir = "\(base)/ringfence-fsaudit-\(getpid())-\(name)"
        try? FileManager.default.removeItem(atPath: dir)
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    // MARK: self

    public func runSelf(_ attacks: [FSAttack], deadline: Double) -> AuditReport {
        let start = monotonicNanoseconds()
        var records: [AuditRecord] = []
        for (i, a) in attacks.enumerated() {
            progress(i + 1, attacks.count, a.name)
            records.append(runSelfOne(a, deadline: deadline))
        }
        return AuditReport(
            target: "RingFence VirtioFSDriver", records: records,
            seconds: Double(monotonicNanoseconds() &- start) / 1e9)
    }

    func runSelfOne(_ a: FSAttack, deadline: Double) -> AuditRecord {
        let dir = scratch(a.name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let result = dir + "/result.json"
        guard
            let child = try? ChildProcess(
                executable: executable,
                arguments: ["audit-one-fs", "--attack", a.name, "--dir", dir, "--result", result])
        else {
            return AuditRecord(fs: a, outcome: .notRun, seconds: 0, evidence: "could not start the probe")
        }
        switch child.wait(until: .after(seconds: deadline)) {
        case nil:
            child.kill()
            return AuditRecord(fs: a, outcome: .hung, seconds: deadline, evidence: "probe did not finish")
        case .signaled(let s)?:
            return AuditRecord(fs: a, outcome: .crashed, seconds: 0, evidence: "probe died with signal \(s)")
        case .exited?:
            break
        }
        guard let data = FileManager.default.contents(atPath: result),
            let r = try? JSONDecoder().decode(FSProbeResult.self, from: data)
        else {
            return AuditRecord(fs: a, outcome: .notRun, seconds: 0, evidence: "no probe result")
        }
        let outcome: Outcome =
            !r.neighbourOK ? .neighbourDisturbed : r.signature == "unaffected" ? .unaffected : .contained
        return AuditRecord(
            fs: a, outcome: outcome, seconds: r.seconds, evidence: r.evidence,
            asExpected: a.expected.contains(r.signature) && r.neighbourOK, signature: r.signature)
    }

    // MARK: linux-guest

    /// The script the guest runs: mount, list, read, write, stat, each bounded (busybox
    /// `timeout`), with markers to grep.
    public static let guestScript = """
        echo 5 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
        run() { timeout 12 "$@" 2>&1; r=$?; [ $r = 0 ] || echo "RF-FAIL rc=$r: $*"; return $r; }
        mkdir -p /mnt
        if ! run mount -t virtiofs rfs /mnt; then echo "RF-NO-MOUNT"; exit 3; fi
        ok=0
        if names=$(timeout 12 ls -1a /mnt 2>&1); then
            echo "RF-NAMES $(echo "$names" | tr '\\n' ' ' | sed 's/[^ -~]/?/g' | head -c 300)"
            echo "$names" | grep -q / && echo "RF-BAD-NAME"
            for n in a b c; do echo "$names" | grep -qx "$n" || echo "RF-LISTING-WRONG: $n missing"; done
        else
            echo "RF-FAIL ls: $(echo "$names" | head -n 2 | tr '\\n' ' ')"; ok=1
        fi
        if a=$(timeout 12 cat /mnt/a 2>&1); then
            [ "$a" = a ] || echo "RF-DATA-MISMATCH a=$a"
        else
            echo "RF-FAIL cat: $a"; ok=1
        fi
        if st=$(timeout 12 stat -c '%F %s' /mnt/a 2>&1); then
            echo "RF-STAT $st"
            [ "$st" = "regular file 1" ] || echo "RF-STAT-WRONG"
        else
            echo "RF-FAIL stat: $st"; ok=1
        fi
        echo hello > /tmp/h
        run cp /tmp/h /mnt/new || ok=1
        echo 3 > /proc/sys/vm/drop_caches
        if b=$(timeout 12 cat /mnt/new 2>&1); then
            [ "$b" = hello ] || echo "RF-DATA-MISMATCH new=$b"
        else
            echo "RF-FAIL cat new: $b"; ok=1
        fi
        run umount /mnt || ok=1
        echo "RF-IO-END ok=$ok"
        """

    /// Outcome and the console lines that show it.
    public static func classify(console: String, timedOut: Bool) -> (Outcome, String) {
        let lines = console.split(whereSeparator: \.isNewline).map(String.init)
        func first(_ needles: [String]) -> String? { lines.first { l in needles.contains { l.contains($0) } } }
        func notable() -> String {
            lines.filter { l in ["fuse", "virtio", "RF-"].contains { l.contains($0) } }.prefix(3)
                .map { String($0.drop(while: { $0 == " " })) }.joined(separator: " ⏎ ")
        }
        if let l = first(["Oops", "BUG:", "kernel BUG", "general protection fault", "Kernel panic", "UBSAN:", "KASAN:"])
        {
            return (.kernelOops, l)
        }
        if let l = first(["blocked for more than", "hung_task"]) { return (.hungTask, l + " ⏎ " + notable()) }
        if timedOut { return (.hung, "guest did not finish: " + notable()) }
        guard lines.contains(where: { $0.contains("RINGFENCE-GUEST-START") }) else {
            return (.contained, "guest never started: " + lines.suffix(2).joined(separator: " ⏎ "))
        }
        if first(["RF-NO-MOUNT"]) != nil { return (.contained, "mount refused: " + notable()) }
        if let l = first(["RF-BAD-NAME", "RF-STAT-WRONG", "RF-DATA-MISMATCH", "RF-LISTING-WRONG"]) {
            return (.acceptedBadData, l + " ⏎ " + (first(["RF-NAMES"]) ?? "") + " ⏎ " + (first(["RF-STAT "]) ?? ""))
        }
        if let l = first(["RF-FAIL"]) { return (.ioError, l + " ⏎ " + notable()) }
        if lines.contains(where: { $0.contains("RF-IO-END ok=0") }) {
            return (.clean, "script passed; " + (first(["RF-NAMES"]) ?? "") + " ⏎ " + (first(["RF-STAT "]) ?? ""))
        }
        return (.contained, "script ended early: " + lines.suffix(2).joined(separator: " ⏎ "))
    }

    public func runLinuxGuest(_ attacks: [FSAttack], deadline: Double, repository: String) throws(AuditError)
        -> AuditReport
    {
        let runGuest = repository + "/scripts/guest/run-guest.sh"
        guard FileManager.default.fileExists(atPath: runGuest) else {
            throw AuditError("scripts/guest/run-guest.sh not found (run from the repository)")
        }
        let start = monotonicNanoseconds()
        var records: [AuditRecord] = []
        for (i, a) in attacks.enumerated() {
            progress(i + 1, attacks.count, a.name)
            records.append(runGuestOne(a, runGuest: runGuest, deadline: deadline))
        }
        return AuditReport(
            target: "Linux 6.1 virtiofs (Debian kernel, QEMU TCG guest)", records: records,
            seconds: Double(monotonicNanoseconds() &- start) / 1e9)
    }

    func runGuestOne(_ a: FSAttack, runGuest: String, deadline: Double) -> AuditRecord {
        if a.target == .config {
            // QEMU's vhost-user-fs-pci serves the config space itself (tag=, num-request-queues=).
            return AuditRecord(
                fs: a, outcome: .notApplicable, seconds: 0,
                evidence: "not applicable: QEMU 7.2 serves the virtio-fs config itself, never the back-end's")
        }
        let dir = scratch(a.name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let shared = dir + "/root"
        try? FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        for name in ["a", "b", "c"] { try? Data(name.utf8).write(to: URL(fileURLWithPath: "\(shared)/\(name)")) }
        let socket = dir + "/fs.sock"
        guard
            let server = try? ChildProcess(
                executable: executable,
                arguments: [
                    "serve-fs", "--socket", socket, "--dir", shared, "--tag", "rfs", "--log-level", "error",
                    "--attack", a.name,
                ])
        else { return AuditRecord(fs: a, outcome: .notRun, seconds: 0, evidence: "serve-fs did not start") }
        defer {
            _ = Glibc.kill(server.pid, SIGTERM)
            if server.wait(until: .after(seconds: 3)) == nil { server.kill() }
        }
        let ready = Deadline.after(seconds: 10)
        while !FileManager.default.fileExists(atPath: socket) && !ready.hasPassed { usleep(10_000) }
        let script = dir + "/fs.sh"
        let console = dir + "/console.txt"
        _ = FileManager.default.createFile(atPath: script, contents: Data(Self.guestScript.utf8))
        var arguments = [
            runGuest, "--script", script, "--modules", "virtio_pci,fuse,virtiofs", "--timeout", "\(Int(deadline))",
            "--console", console, "--quiet", "--append", "sysctl.kernel.hung_task_timeout_secs=5",
            "--qemu-arg", "-chardev", "--qemu-arg", "socket,id=fs0,path=\(socket)",
            "--qemu-arg", "-device", "--qemu-arg", "vhost-user-fs-pci,chardev=fs0,tag=rfs,vectors=0",
        ]
        if let imageDir { arguments += ["--image-dir", imageDir] }
        let t0 = monotonicNanoseconds()
        let output = dir + "/run-guest.out"
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        let status = Auditor(imageDir: imageDir, executable: executable).runToCompletion(
            ["/bin/bash"] + arguments, output: output, deadline: deadline + 20, console: console)
        let seconds = Double(monotonicNanoseconds() &- t0) / 1e9
        let text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? ""
        let hostLog = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        let (outcome, evidence) = Self.classify(
            console: text.isEmpty ? hostLog : text, timedOut: status == nil || status == 124)
        return AuditRecord(fs: a, outcome: outcome, seconds: seconds, evidence: evidence)
    }
}
