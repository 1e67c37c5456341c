import Adversary
import ArgumentParser
import Foundation
import SharedMemory

#if canImport(Glibc)
import Glibc
#endif

enum AuditTarget: String, ExpressibleByArgument, CaseIterable {
    case `self`
    case linuxGuest = "linux-guest"
    case command
    case xenNet = "xen-net"
}

enum AuditDevice: String, ExpressibleByArgument, CaseIterable {
    case blk
    case fs
}

/// `ringfence audit`: aims the adversary catalogue at a driver and reports what it did.
struct AuditCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Run the malicious-device catalogue against a driver; print a report.",
        discussion: """
            Targets: `self` (our VirtioBlock driver, each attack in a fresh child process), \
            `linux-guest` (Linux 6.1 virtio_blk in a QEMU TCG guest, see scripts/guest), \
            `command` (any program after `--`; `{socket}` in its arguments is replaced by the \
            socket path, otherwise the path is appended). Markdown to stdout, progress to stderr. \
            With `--device fs` the fs catalogue runs instead: `self` is our VirtioFS driver, \
            `linux-guest` Linux 6.1 virtiofs (`--device fs --list` shows the attacks).
            """)

    @Option(help: "self, linux-guest, command or xen-net.") var target: AuditTarget = .self
    @Option(help: "Device class whose catalogue runs: blk or fs (self and linux-guest only).")
    var device: AuditDevice = .blk
    @Option(help: "Comma-separated attack names (default: the whole catalogue).") var only: [String] = []
    @Option(help: "Also write the report as JSON to this file.") var json: String?
    @Option(name: .customLong("attack-after"), help: "Requests served correctly before each attack starts.")
    var attackAfter: Int?
    @Option(help: "Seconds one attack may take before it counts as hung.") var deadline: Double?
    @Option(
        name: .customLong("image-dir"),
        help: "Guest image folder (linux-guest; default .build-guest or $RINGFENCE_GUEST_DIR).")
    var imageDir: String?
    @Flag(help: "List the catalogue and exit.") var list = false
    @Argument(parsing: .postTerminator, help: "The command to audit (after --).") var command: [String] = []

    func validate() throws {
        if target == .command && command.isEmpty && !list {
            throw ValidationError("--target command needs a command after --")
        }
        if target == .xenNet {
            let known = Set(
                XenNetBackendAttack.allCases.map(\.rawValue) + XenNetFrontendAttack.allCases.map(\.rawValue))
            if let bad = only.first(where: { !known.contains($0) }) { throw ValidationError("unknown attack \(bad)") }
            return
        }
        if device == .fs {
            if target == .command { throw ValidationError("--device fs audits self or linux-guest") }
            for n in only.flatMap({ $0.split(separator: ",") }) where FSCatalogue.attack(named: String(n)) == nil {
                throw ValidationError("unknown fs attack '\(n)' (see `ringfence audit --device fs --list`)")
            }
            return
        }
        if case .failure(let e) = Catalogue.select(only) { throw ValidationError(e.description) }
    }

    func run() throws {
        if device == .fs { return try runFS() }
        if list && target != .xenNet {
            for a in Catalogue.all {
                print("\(a.name)\t\(a.rule.rawValue)\t\(a.group.rawValue)\t\(a.summary)")
            }
            return
        }
        let attacks = only.isEmpty ? Catalogue.all : ((try? Catalogue.select(only).get()) ?? [])
        let auditor = Auditor(after: attackAfter, imageDir: imageDir)
        let report: AuditReport
        switch target {
        case .self: report = auditor.runSelf(attacks, deadline: deadline ?? 25)
        case .linuxGuest: report = try auditor.runLinuxGuest(attacks, deadline: deadline ?? 60)
        case .command: report = auditor.runCommand(attacks, command: command, deadline: deadline ?? 30)
        case .xenNet: return try runXenNet()
        }
        print(report.markdown, terminator: "")
        if let json { try report.json().write(to: URL(fileURLWithPath: json)) }
    }
}

extension AuditCommand {
    /// `--target xen-net`: every netif attack in process (our netfront against a
    /// misbehaving netback, our netback against a misbehaving netfront); exit 1 if one
    /// was not contained.
    func runXenNet() throws {
        let backend = XenNetBackendAttack.allCases.filter { only.isEmpty || only.contains($0.rawValue) }
        let frontend = XenNetFrontendAttack.allCases.filter { only.isEmpty || only.contains($0.rawValue) }
        if list {
            for a in backend { print("\(a.rawValue)\tnetfront\t\(a.expectedViolation ?? "stays up")") }
            for a in frontend { print("\(a.rawValue)\tnetback\t\(a.mustDrop ? "dropped" : "refused")") }
            return
        }
        let records = Auditor.auditXenNet(
            backendAttacks: backend, frontendAttacks: frontend, timeout: min(deadline ?? 2, 30)
        ) { FileHandle.standardError.write(Data("\($0)\n".utf8)) }
        print("# Xen netif audit\n")
        print(Auditor.xenNetMarkdown(records), terminator: "")
        if records.contains(where: { !$0.isSafe }) { throw ExitCode(1) }
    }

    /// The fs catalogue (`FSCatalogue`) against our driver or Linux's virtiofs.
    func runFS() throws {
        if list {
            for a in FSCatalogue.all { print("\(a.name)\t\(a.rule.rawValue)\tfs\t\(a.summary)") }
            return
        }
        let names = Set(only.flatMap { $0.split(separator: ",") }.map(String.init))
        let attacks = names.isEmpty ? FSCatalogue.all : FSCatalogue.all.filter { names.contains($0.name) }
        let auditor = FSAuditor(imageDir: imageDir)
        let report: AuditReport
        switch target {
        case .self: report = auditor.runSelf(attacks, deadline: deadline ?? 25)
        case .linuxGuest:
            report = try auditor.runLinuxGuest(
                attacks, deadline: deadline ?? 60, repository: FileManager.default.currentDirectoryPath)
        case .command, .xenNet: throw ValidationError("--device fs audits self or linux-guest")
        }
        print(report.markdown, terminator: "")
        if let json { try report.json().write(to: URL(fileURLWithPath: json)) }
    }
}

/// `ringfence audit-one-fs`: one fs attack against our driver, in this (fresh) process.
/// Used by `audit --device fs`; writes an `FSProbeResult` as JSON.
struct AuditOneFSCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit-one-fs", abstract: "Run one fs attack against our driver in this process (used by audit).",
        shouldDisplay: false)

    @Option var attack: String
    @Option var dir: String
    @Option var result: String

    func run() throws {
        guard let a = FSCatalogue.attack(named: attack) else { throw ValidationError("unknown attack \(attack)") }
        let r = FSProbe.run(a, directory: dir)
        try JSONEncoder().encode(r).write(to: URL(fileURLWithPath: result))
    }
}

/// `ringfence audit-one`: one attack against our driver, in this (fresh) process. Used by
/// `audit --target self`; writes a `ProbeResult` as JSON.
struct AuditOneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit-one", abstract: "Run one attack against our driver in this process (used by audit).",
        shouldDisplay: false)

    @Option var attack: String
    @Option var dir: String
    @Option var result: String
    @Option(name: .customLong("attack-after")) var attackAfter: Int?

    func run() throws {
        guard let a = Catalogue.attack(named: attack) else { throw ValidationError("unknown attack \(attack)") }
        let r = DriverProbe.run(a, after: attackAfter, directory: dir)
        try JSONEncoder().encode(r).write(to: URL(fileURLWithPath: result))
    }
}
