public import Foundation

/// What a target did against one attack, as the report shows it.
public enum Outcome: String, Sendable, Codable, CaseIterable {
    /// Failed with an error that names the fault (or the request failed cleanly).
    case contained = "contained-with-error"
    /// Nothing the driver relies on changed: every request succeeded intact.
    case unaffected
    /// Requests succeeded with wrong bytes (allowed by the threat model, but noted).
    case acceptedBadData = "silently accepted bad data"
    /// Payload lies (issue 18) against a layer that cannot see them: every request
    /// succeeded, the bytes were the back-end's lie (allowed by §1, reported as such).
    case undetectedTampering = "undetected payload tampering"
    /// The target died of a signal.
    case crashed = "crashed with signal"
    /// The target did not finish before the deadline.
    case hung = "hung past deadline"
    /// The private canary showed up in shared memory (R7 broken).
    case leakedCanary = "leaked canary"
    /// Our target only: the healthy second device of the same process was disturbed.
    case neighbourDisturbed = "disturbed another device"
    /// Guest targets: the kernel reported an oops or BUG.
    case kernelOops = "kernel oops or BUG"
    /// Guest targets: the kernel reported a hung task.
    case hungTask = "hung task"
    /// Guest targets: I/O errors surfaced to user space (contained, the device failed).
    case ioError = "I/O error"
    /// Guest targets: the I/O script ran to the end with nothing in the log.
    case clean
    /// The target could not be run at all (harness problem, not a finding).
    case notRun = "not run"
    /// The attack needs a ring format the target did not negotiate (a packed-ring attack
    /// against a split-ring driver): skipped, neither a pass nor a finding.
    case notApplicable = "not applicable"

    /// Whether the outcome keeps docs/design.md §1's promises (not run and not applicable
    /// prove nothing, so they are not safe).
    public var isSafe: Bool {
        switch self {
        case .contained, .unaffected, .ioError, .clean: return true
        case .acceptedBadData, .undetectedTampering: return true  // allowed, reported
        default: return false
        }
    }
}

/// One row of the report.
public struct AuditRecord: Sendable, Codable, Equatable {
    /// The attack's name.
    public var attack: String
    /// The attack's group.
    public var group: String
    /// The rule the attack tests.
    public var rule: String
    /// What the target did.
    public var outcome: Outcome
    /// Seconds until the target reported the fault (or the script ended).
    public var seconds: Double
    /// The line that shows it (error message, kernel log, ...).
    public var evidence: String
    /// For our driver: whether the outcome is the one the catalogue expects.
    public var asExpected: Bool?
    /// For our driver: the error signature it reported.
    public var signature: String?

    /// A row for `attack`.
    public init(
        attack: Attack, outcome: Outcome, seconds: Double, evidence: String, asExpected: Bool? = nil,
        signature: String? = nil
    ) {
        self.attack = attack.name
        self.group = attack.group.rawValue
        self.rule = attack.rule.rawValue
        self.outcome = outcome
        self.seconds = seconds
        self.evidence = evidence
        self.asExpected = asExpected
        self.signature = signature
    }
}

/// The whole report: Markdown for people, JSON for tools.
public struct AuditReport: Sendable, Codable, Equatable {
    /// What was audited.
    public var target: String
    /// One row per attack, in the order they ran.
    public var records: [AuditRecord]
    /// Wall time of the whole audit, in seconds.
    public var seconds: Double
    /// Guest targets: the kernel audited (nil for drivers in processes).
    public var kernel: GuestKernel?

    /// A report of `records` against `target` (and, for guest targets, the kernel audited).
    public init(target: String, records: [AuditRecord], seconds: Double, kernel: GuestKernel? = nil) {
        self.target = target
        self.records = records
        self.seconds = seconds
        self.kernel = kernel
    }

    /// A Markdown table: attack, rule, outcome, time to detect, evidence; then a tally.
    public var markdown: String {
        let withExpected = records.contains { $0.asExpected != nil }
        var lines = kernel.map { [$0.markdown] } ?? []
        lines += [
            "| # | attack | rule | outcome | detect (s) | evidence |" + (withExpected ? " expected |" : ""),
            "|---|---|---|---|---|---|" + (withExpected ? "---|" : ""),
        ]
        for (i, r) in records.enumerated() {
            var line =
                "| \(i + 1) | `\(r.attack)` | \(r.rule) | \(r.outcome.rawValue) | "
                + String(format: "%.2f", r.seconds) + " | \(Self.cell(r.evidence)) |"
            if withExpected {
                line += r.outcome == .notApplicable ? " n/a |" : r.asExpected == true ? " yes |" : " **NO** |"
            }
            lines.append(line)
        }
        var tally: [Outcome: Int] = [:]
        for r in records { tally[r.outcome, default: 0] += 1 }
        let summary = Outcome.allCases.compactMap { o in tally[o].map { "\($0) \(o.rawValue)" } }
        lines.append("")
        lines.append(
            "\(records.count) attacks against \(target) in " + String(format: "%.1f", seconds) + " s: "
                + summary.joined(separator: ", ") + ".")
        let skipped = records.filter { $0.outcome == .notApplicable }.map(\.attack)
        if !skipped.isEmpty { lines.append("Not applicable (skipped): " + skipped.joined(separator: ", ") + ".") }
        if withExpected {
            let bad = records.filter { $0.asExpected != true && $0.outcome != .notApplicable }.map(\.attack)
            lines.append(
                bad.isEmpty
                    ? "Every outcome is the one the catalogue expects."
                    : "Unexpected: " + bad.joined(separator: ", ") + ".")
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// The report as pretty-printed JSON.
    public func json() throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try e.encode(self)
    }

    /// Keeps a table cell on one line and short.
    static func cell(_ s: String) -> String {
        var t = s.replacingOccurrences(of: "|", with: "\\|").replacingOccurrences(of: "\n", with: " ⏎ ")
        if t.count > 220 { t = String(t.prefix(217)) + "..." }
        return t
    }
}

extension ProbeResult {
    /// Our driver's result as a report row.
    public func record(for attack: Attack) -> AuditRecord {
        if signature == .notApplicable {
            return AuditRecord(
                attack: attack, outcome: .notApplicable, seconds: seconds, evidence: "not applicable: \(evidence)",
                signature: signature.description)
        }
        let outcome: Outcome
        if canaryFound {
            outcome = .leakedCanary
        } else if !neighbourOK {
            outcome = .neighbourDisturbed
        } else {
            switch signature {
            case .unaffected: outcome = .unaffected
            case .wrongPayload: outcome = .acceptedBadData
            default: outcome = .contained
            }
        }
        let expected = attack.expected.contains(signature) && !canaryFound && neighbourOK
        return AuditRecord(
            attack: attack, outcome: outcome, seconds: seconds,
            evidence: "\(signature): \(evidence)", asExpected: expected, signature: signature.description)
    }
}
