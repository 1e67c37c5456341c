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

enum AuditDevice: String, ExpressibleByArgument, CaseIterable {
    case blk
    case fs
    case net
}

/// `ringfence audit`: aims the adversary catalogue at a driver and reports what it did.
struct AuditCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "audit",
        abstract: "Run the malicious-device catalogue against a driver; print a report.",
        discussion: """
            Targets: `self` (our VirtioBlock driver, each attack in a fresh child process), \
            `linux-guest` (Linux virtio_blk in a QEMU TCG guest, see scripts/guest: Debian's 6.1 \
            kernel, or your own with --kernel BZIMAGE and its modules from --modules DIR or \
            --modules-deb FILE; the report names the kernel and its CONFIG_VIRTIO*/SWIOTLB/... flags), \
            `command` (any program after `--`; `{socket}` in its arguments is replaced by the \
            socket path, otherwise the path is appended), `xen-net` (the netif attacks, in \
            process), `payload` (issue 18's payload lies against the plain driver and against \
            VerifiedBlock over it; exit 1 if a row is not the expected one). Markdown to stdout, \
            progress to stderr. `--device fs` runs the fs catalogue instead (`self`: our VirtioFS \
            driver; `linux-guest`: Linux 6.1 virtiofs); `--device net` the virtio-net section \
            (`self`: our VirtioNet driver; `linux-guest`: Linux 6.1 virtio_net through \
            scripts/guest/net-audit.sh; `command`: any driver program). `--list` shows a catalogue.
            """)

    @Option(help: "self, linux-guest, command, xen-net or payload.") var target: AuditTarget = .self
    @Option(
        help: "Device class whose catalogue runs: blk, fs (self, linux-guest) or net (self, linux-guest, command).")
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
    @Option(help: "linux-guest: audit this kernel (a bzImage) instead of Debian's 6.1.")
    var kernel: String?
    @Option(help: "linux-guest: --kernel's modules (lib/modules/RELEASE, or a root that holds it).")
    var modules: String?
    @Option(
        name: .customLong("modules-deb"),
        help: "linux-guest: a linux-image .deb with the modules (and the kernel when --kernel is absent).")
    var modulesDeb: String?
    @Option(help: "linux-guest: --kernel's .config (default: boot/config-RELEASE next to the modules).")
    var config: String?
    @Flag(help: "List the catalogue and exit.") var list = false
    @Argument(parsing: .postTerminator, help: "The command to audit (after --).") var command: [String] = []

    /// `--only a,b --only c` as names.
    var onlyNames: [String] { only.flatMap { $0.split(separator: ",").map(String.init) } }

    func validate() throws {
        if guestKernel != nil && (device != .blk || target == .payload || target == .xenNet) {
            throw ValidationError(
                "--kernel, --modules, --modules-deb and --config audit virtio_blk (--device blk) only")
        }
        if device == .net {
            guard target == .self || target == .command || target == .linuxGuest else {
                throw ValidationError("--device net: targets self, linux-guest and command")
            }
            if target == .command && command.isEmpty && !list {
                throw ValidationError("--target command needs a command after --")
            }
            if let bad = onlyNames.first(where: { NetCatalogue.attack(named: $0) == nil }) {
                throw ValidationError("unknown net attack '\(bad)'")
            }
            return
        }
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
        if device == .fs {
            if target == .command { throw ValidationError("--device fs audits self or linux-guest") }
            for n in only.flatMap({ $0.split(separator: ",") }) where FSCatalogue.attack(named: String(n)) == nil {
                throw ValidationError("unknown fs attack '\(n)' (see `ringfence audit --device fs --list`)")
            }
            return
        }
        if case .failure(let e) = Catalogue.select(only) { throw ValidationError(e.description) }
        if guestKernel != nil && target != .linuxGuest {
            throw ValidationError("--kernel, --modules, --modules-deb and --config need --target linux-guest")
        }
        if modules != nil && modulesDeb != nil { throw ValidationError("give --modules or --modules-deb, not both") }
        if kernel == nil && modulesDeb == nil && guestKernel != nil {
            throw ValidationError("--modules and --config need --kernel")
        }
        for file in [kernel, modulesDeb, config].compactMap({ $0 }) where !FileManager.default.fileExists(atPath: file)
        {
            throw ValidationError("no such file: \(file)")
        }
    }

    /// Your own kernel, with paths made absolute (the image is built from the repository).
    var guestKernel: GuestKernelSource? {
        guard kernel != nil || modules != nil || modulesDeb != nil || config != nil else { return nil }
        func absolute(_ p: String?) -> String? { p.map { URL(fileURLWithPath: $0).standardizedFileURL.path } }
        return GuestKernelSource(
            kernel: absolute(kernel), modules: absolute(modules), modulesDeb: absolute(modulesDeb),
            config: absolute(config))
    }

    func run() throws {
        if target == .payload { return try runPayload() }
        if device == .fs { return try runFS() }
        if device == .net { return try runNet() }
        if list && target != .xenNet {
            for a in Catalogue.all {
                print("\(a.name)\t\(a.rule.rawValue)\t\(a.group.rawValue)\t\(a.summary)")
            }
            return
        }
        let attacks = only.isEmpty ? Catalogue.all : ((try? Catalogue.select(only).get()) ?? [])
        let auditor = Auditor(after: attackAfter, imageDir: imageDir, guestKernel: guestKernel)
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

    /// The virtio-net section (`NetCatalogue`) against our driver or any driver program.
    func runNet() throws {
        if list {
            for a in NetCatalogue.all { print("\(a.name)\t\(a.rule.rawValue)\t\(a.group.rawValue)\t\(a.summary)") }
            return
        }
        let attacks = onlyNames.isEmpty ? NetCatalogue.all : onlyNames.compactMap(NetCatalogue.attack(named:))
        if target == .linuxGuest {
            let seconds = deadline ?? 45
            let guest = try Self.netGuestCommand(
                repository: FileManager.default.currentDirectoryPath, imageDir: imageDir,
                guestTimeout: Int(seconds.rounded(.up)) + 15)
            let rows = NetCommandAudit.run(attacks, command: guest, seconds: seconds) { r in
                FileHandle.standardError.write(Data("\(r.attack.name): \(r.effect)\n".utf8))
            }
            print(
                NetCommandAudit.markdown(
                    rows, title: "virtio-net adversary against Linux 6.1 virtio_net (QEMU TCG guest)", command: guest),
                terminator: "")
            return
        }
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
    }

    /// The modules `--device net --target linux-guest` loads in the guest, in order.
    static let netGuestModules =
        "virtio_ring,virtio,virtio_pci_legacy_dev,virtio_pci_modern_dev,virtio_pci,failover,net_failover,virtio_net"

    /// The guest `--device net --target linux-guest` runs per attack (docs/audit-linux-6.1-net.md):
    /// scripts/guest/run-guest.sh with net-audit.sh and a virtio-net-pci on `{socket}`.
    static func netGuestCommand(repository: String, imageDir: String?, guestTimeout: Int) throws -> [String] {
        let runGuest = repository + "/scripts/guest/run-guest.sh"
        let script = repository + "/scripts/guest/net-audit.sh"
        guard FileManager.default.fileExists(atPath: runGuest), FileManager.default.fileExists(atPath: script) else {
            throw ValidationError("scripts/guest/run-guest.sh and net-audit.sh not found (run from the repository)")
        }
        var command = [
            "/bin/bash", runGuest, "--script", script, "--modules", netGuestModules, "--timeout", "\(guestTimeout)",
            "--qemu-arg", "-chardev", "--qemu-arg", "socket,id=c0,path={socket}",
            "--qemu-arg", "-netdev", "--qemu-arg", "vhost-user,id=n0,chardev=c0",
            "--qemu-arg", "-device", "--qemu-arg", "virtio-net-pci,netdev=n0,vectors=0,mac=52:54:00:00:00:0a",
        ]
        if let imageDir { command += ["--image-dir", URL(fileURLWithPath: imageDir).standardizedFileURL.path] }
        return command
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
        case .command, .xenNet, .payload: throw ValidationError("--device fs audits self or linux-guest")
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
