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
            socket path, otherwise the path is appended). Markdown to stdout, progress to stderr.
            """)

    @Option(help: "self, linux-guest or command.") var target: AuditTarget = .self
    @Option(help: "blk, or net (the virtio-net section; target self only).") var device = "blk"
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

    /// `--only a,b --only c` as names.
    var netNames: [String] { only.flatMap { $0.split(separator: ",").map(String.init) } }

    func validate() throws {
        guard device == "blk" || device == "net" else { throw ValidationError("--device blk or net") }
        if device == "net" {
            guard target != .linuxGuest else { throw ValidationError("--device net: targets self and command") }
            if target == .command && command.isEmpty && !list {
                throw ValidationError("--target command needs a command after --")
            }
            if let bad = netNames.first(where: { NetCatalogue.attack(named: $0) == nil }) {
                throw ValidationError("unknown net attack '\(bad)'")
            }
            return
        }
        if target == .command && command.isEmpty && !list {
            throw ValidationError("--target command needs a command after --")
        }
        if case .failure(let e) = Catalogue.select(only) { throw ValidationError(e.description) }
    }

    func run() throws {
        if device == "net" {
            if list {
                for a in NetCatalogue.all { print("\(a.name)\t\(a.rule.rawValue)\t\(a.group.rawValue)\t\(a.summary)") }
                return
            }
            let attacks = netNames.isEmpty ? NetCatalogue.all : netNames.compactMap(NetCatalogue.attack(named:))
            if target == .command {
                let rows = NetCommandAudit.run(attacks, command: command, seconds: deadline ?? 5) { r in
                    FileHandle.standardError.write(Data("\(r.attack.name): \(r.effect)\n".utf8))
                }
                print(
                    NetCommandAudit.markdown(rows, title: "virtio-net adversary against a driver", command: command),
                    terminator: "")
                return
            }
            let (markdown, contained) = NetCatalogue.auditSelf(attacks) { r in
                FileHandle.standardError.write(Data("\(r.attack): \(r.signature)\n".utf8))
            }
            print(markdown, terminator: "")
            if !contained { throw ExitCode(1) }
            return
        }
        if list {
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
        }
        print(report.markdown, terminator: "")
        if let json { try report.json().write(to: URL(fileURLWithPath: json)) }
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
