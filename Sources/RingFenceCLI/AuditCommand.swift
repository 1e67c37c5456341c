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
    case payload
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
            socket path, otherwise the path is appended), `payload` (issue 18's payload lies \
            against the plain driver and against VerifiedBlock over it; exit 1 if a row is not \
            the expected one). Markdown to stdout, progress to stderr.
            """)

    @Option(help: "self, linux-guest, command, xen-net or payload.") var target: AuditTarget = .self
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
        if target == .payload {
            let known = Set(Catalogue.payloadLies.map(\.name))
            if let bad = only.first(where: { !known.contains($0) }) { throw ValidationError("unknown attack \(bad)") }
            return
        }
        if case .failure(let e) = Catalogue.select(only) { throw ValidationError(e.description) }
    }

    func run() throws {
        if target == .payload { return try runPayload() }
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
        case .payload: return try runPayload()
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
}

extension AuditCommand {
    /// Both reports of `--target payload`, as `--json` writes them.
    struct PayloadReports: Codable {
        var plain: AuditReport
        var verified: AuditReport
    }

    /// `--target payload`: each payload lie against the plain driver (expected: undetected
    /// payload tampering) and against the verified layer (expected: contained, with the
    /// violation that names the lie); exit 1 if a row is not the expected one.
    func runPayload() throws {
        let attacks = Catalogue.payloadLies.filter { only.isEmpty || only.contains($0.name) }
        if list {
            for a in attacks { print("\(a.name)\t\(a.rule.rawValue)\t\(a.group.rawValue)\t\(a.summary)") }
            return
        }
        let auditor = Auditor(after: attackAfter, imageDir: imageDir)
        let reports = PayloadReports(
            plain: auditor.runPayload(attacks, layer: .plain), verified: auditor.runPayload(attacks, layer: .verified))
        print("## Payload lies against the plain driver\n")
        print(reports.plain.markdown)
        print("## Payload lies against the verified layer\n")
        print(reports.verified.markdown, terminator: "")
        if let json {
            let e = JSONEncoder()
            e.outputFormatting = [.prettyPrinted, .sortedKeys]
            try e.encode(reports).write(to: URL(fileURLWithPath: json))
        }
        let all = reports.plain.records + reports.verified.records
        if all.contains(where: { $0.asExpected != true }) { throw ExitCode(1) }
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
