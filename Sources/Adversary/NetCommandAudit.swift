import Foundation
import SharedMemory
import VhostUser
import VirtioNet

/// The net section against any driver program (DPDK's testpmd with virtio_user, ...): per
/// attack, `NetAdversaryDevice` serves a fresh socket in this process, the command runs
/// against it for `seconds`, then gets a newline on stdin (testpmd's "Press enter to
/// exit") and `stopSeconds` to exit. What is reported is what was observed: the exit (a
/// signal is a crash, no exit a hang), the device side's view, and the program's own lines
/// about errors and drops as evidence.
public enum NetCommandAudit {
    public struct Row: Sendable {
        public let attack: NetAttack
        public let effect: String
        public let evidence: [String]
        public let safe: Bool
    }

    /// Evidence lines kept per attack (the last ones).
    nonisolated(unsafe) public static var maximumEvidence = 8

    public static func run(
        _ attacks: [NetAttack], command: [String], environment: [String: String] = [:], seconds: Double = 5,
        stopSeconds: Double = 10, delay: Double = 2, progress: (Row) -> Void = { _ in }
    ) -> [Row] {
        attacks.map { attack in
            let row = runOne(
                attack, command: command, environment: environment, seconds: seconds, stopSeconds: stopSeconds,
                delay: delay)
            progress(row)
            return row
        }
    }

    static func runOne(
        _ attack: NetAttack, command: [String], environment: [String: String], seconds: Double, stopSeconds: Double,
        delay: Double
    ) -> Row {
        let dir = NSTemporaryDirectory() + "rf-net-audit-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let socket = dir + "/net.sock"
        let events = EventLines()
        let record: @Sendable (BackendEvent) -> Void = { events.append("\($0)") }
        let inner = VirtioNetDevice(
            fabric: NetFabric(mode: .loopback), options: VirtioNetDeviceOptions(), onEvent: record)
        let device = NetAdversaryDevice(inner: inner, attack: attack, delay: delay)
        var configuration = Backend.Configuration()
        configuration.pollInterval = 0.05
        configuration.queueTiming.idleTick = 0.2
        let backend = Backend(device: device, configuration: configuration, onEvent: record)
        guard let listener = try? UnixListener(path: socket) else {
            return Row(attack: attack, effect: "not run: cannot listen", evidence: [], safe: false)
        }
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            try? backend.run(listener: listener)
            done.signal()
        }
        defer {
            backend.stop()
            done.wait()
        }
        let arguments = command.map { $0.replacingOccurrences(of: "{socket}", with: socket) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: arguments[0])
        p.arguments = Array(arguments.dropFirst())
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let input = Pipe()
        let outputPath = dir + "/out.log"
        _ = FileManager.default.createFile(atPath: outputPath, contents: nil)
        guard let out = try? FileHandle(forWritingTo: URL(fileURLWithPath: outputPath)) else {
            return Row(attack: attack, effect: "not run: no log file", evidence: [], safe: false)
        }
        p.standardInput = input
        p.standardOutput = out
        p.standardError = out
        do { try p.run() } catch {
            return Row(attack: attack, effect: "not run: \(error)", evidence: [], safe: false)
        }
        let end = Date().addingTimeInterval(seconds)
        while Date() < end && p.isRunning { usleep(50_000) }
        var effect: String
        var safe = true
        if !p.isRunning {
            effect = describeExit(p, early: true)
            safe = p.terminationReason == .exit
        } else {
            try? input.fileHandleForWriting.write(contentsOf: Data("\n".utf8))
            let stop = Date().addingTimeInterval(stopSeconds)
            while Date() < stop && p.isRunning { usleep(50_000) }
            if p.isRunning {
                kill(p.processIdentifier, SIGKILL)
                p.waitUntilExit()
                effect = "hung: did not exit within \(Int(stopSeconds)) s of the stop request (killed)"
                safe = false
            } else {
                effect = describeExit(p, early: false)
                safe = p.terminationReason == .exit
            }
        }
        try? out.close()
        let log = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        var evidence = log.split(whereSeparator: \.isNewline).map(String.init).filter { line in
            let l = line.lowercased()
            return
                (l.contains("error") || l.contains("drop") || l.contains("invalid") || l.contains("fail")
                || l.contains("segmentation") || l.contains("abort") || l.contains("rx-packets")
                || l.contains("rx-error") || l.contains("rx-nombuf") || l.contains("bad") || l.contains("mac")
                || l.contains("rx_stat") || l.contains("guest-log") || l.contains("panic")
                || l.contains("run-guest: fail") || l.contains("cookie") || l.contains("vring"))
                && !l.contains("promiscuous") && !l.contains("allmulticast")
        }
        var seen = Set<String>()
        evidence = evidence.filter { seen.insert($0.trimmingCharacters(in: .whitespaces)).inserted }
        let fired = events.all.contains { $0.contains("queue 0 started") }
        if !fired { effect += "; its receive queue never started (attack not delivered)" }
        return Row(attack: attack, effect: effect, evidence: Array(evidence.suffix(maximumEvidence)), safe: safe)
    }

    static func describeExit(_ p: Process, early: Bool) -> String {
        if p.terminationReason == .uncaughtSignal {
            return "crashed: killed by signal \(p.terminationStatus)\(early ? " before the stop request" : "")"
        }
        return early
            ? "exited on its own with status \(p.terminationStatus) before the stop request"
            : "survived: stopped on request, exit status \(p.terminationStatus)"
    }

    public static func markdown(_ rows: [Row], title: String, command: [String]) -> String {
        var s = "# \(title)\n\n"
        s += "Command: `\(command.joined(separator: " "))`\n\n"
        s += "| attack | rule | what the device did | observed effect | evidence (the program's own lines) |\n"
        s += "|---|---|---|---|---|\n"
        for r in rows {
            let evidence = r.evidence.map {
                "`\($0.trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "|", with: "/"))`"
            }
            .joined(separator: "<br>")
            s += "| \(r.attack.name) | \(r.attack.rule.rawValue) | \(r.attack.summary) | \(r.effect) | \(evidence) |\n"
        }
        return s
    }
}

final class EventLines: @unchecked Sendable {
    let lock = NSLock()
    var lines: [String] = []
    func append(_ s: String) {
        lock.lock()
        lines.append(s)
        lock.unlock()
    }
    var all: [String] {
        lock.lock()
        defer { lock.unlock() }
        return lines
    }
}
