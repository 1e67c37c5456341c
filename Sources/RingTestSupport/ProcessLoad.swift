import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// What a process did over a stretch of time, for the idle-CPU tests of the servers'
/// wait strategies (`--poll` against the default).
///
/// CPU seconds alone cannot tell a poller from a sleeper on a loaded machine: a poller
/// that yields between looks (`sched_yield`) gets almost no CPU while other work is
/// runnable. Whether one of its threads is *runnable* (state `R`) does not depend on load:
/// a poller always is, a sleeper almost never.
public struct ProcessLoad: Sendable {
    /// User + system CPU seconds the process used.
    public var cpuSeconds: Double
    /// Fraction of samples (every 10 ms) in which at least one of its threads was
    /// running or runnable.
    public var runnableFraction: Double

    /// Watches `pid` for `seconds`.
    public static func measure(_ pid: Int32, seconds: Double) -> ProcessLoad {
        let before = cpuSeconds(pid)
        let samples = max(1, Int(seconds * 100))
        var runnable = 0
        for _ in 0..<samples {
            if anyThreadRunnable(pid) { runnable += 1 }
            usleep(10_000)
        }
        return ProcessLoad(
            cpuSeconds: cpuSeconds(pid) - before, runnableFraction: Double(runnable) / Double(samples))
    }

    /// CPU seconds (user + system) `pid` has used, from /proc/PID/stat; -1 if unreadable.
    public static func cpuSeconds(_ pid: Int32) -> Double {
        guard let (user, system) = statFields("/proc/\(pid)/stat", { ($0[11], $0[12]) }),
            let u = Double(user), let s = Double(system)
        else { return -1 }
        return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    static func anyThreadRunnable(_ pid: Int32) -> Bool {
        guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task") else {
            return false
        }
        return tasks.contains { statFields("/proc/\(pid)/task/\($0)/stat", { $0[0] }) == "R" }
    }

    /// The fields after "pid (comm)" (state is field 0, utime 11, stime 12).
    static func statFields<T>(_ path: String, _ pick: ([Substring]) -> T) -> T? {
        guard let stat = try? String(contentsOfFile: path, encoding: .utf8), let close = stat.lastIndex(of: ")")
        else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 12 ? pick(fields) : nil
    }
}
