#if canImport(Glibc)
import Glibc
#endif

/// A child process started with posix_spawn (no fork in a threaded Swift process), with
/// chosen descriptors placed at fixed numbers from 3 up.
public final class ChildProcess: @unchecked Sendable {
    // @unchecked Sendable: `pid` is immutable; `reaped` is written by `wait`/`kill`, which
    // one owner calls (the auditor's loop, the demo): not for concurrent waits.
    public let pid: Int32
    private var reaped: Int32?

    /// - Parameter stdout: if given, the child's stdout and stderr go there.
    public init(
        executable: String, arguments: [String], passing descriptors: [Int32] = [], stdout: Int32? = nil
    ) throws(SystemError) {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let stdout {
            posix_spawn_file_actions_adddup2(&actions, stdout, 1)
            posix_spawn_file_actions_adddup2(&actions, stdout, 2)
        }
        for (i, fd) in descriptors.enumerated() {
            // dup2 onto 3+i clears CLOEXEC on the copy only.
            posix_spawn_file_actions_adddup2(&actions, fd, Int32(3 + i))
        }
        let argv = ([executable] + arguments).map { strdup($0) }
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        var vector = argv + [nil]
        let rc = vector.withUnsafeMutableBufferPointer { p -> Int32 in
            guard let argv = p.baseAddress else { return EINVAL }
            return posix_spawn(&pid, executable, &actions, nil, argv, environ)
        }
        guard rc == 0 else { throw SystemError("posix_spawn(\(executable))", errno: .init(rawValue: rc)) }
        self.pid = pid
    }

    /// How the child ended.
    public enum Exit: Equatable, Sendable, CustomStringConvertible {
        case exited(Int32)
        case signaled(Int32)
        public var description: String {
            switch self {
            case .exited(let c): return "exited with status \(c)"
            case .signaled(let s): return "killed by signal \(s)"
            }
        }
    }

    /// Waits for the child until `deadline`; nil if it is still running then.
    public func wait(until deadline: Deadline) -> Exit? {
        while true {
            if let status = reap(blocking: false) { return Self.decode(status) }
            if deadline.hasPassed { return nil }
            usleep(2000)
        }
    }

    /// Sends SIGKILL and reaps.
    @discardableResult
    public func kill() -> Exit? {
        if reaped == nil { _ = Glibc.kill(pid, SIGKILL) }
        return wait(until: .after(seconds: 5))
    }

    private func reap(blocking: Bool) -> Int32? {
        if let reaped { return reaped }
        var status: Int32 = 0
        let r = waitpid(pid, &status, blocking ? 0 : WNOHANG)
        if r == pid {
            reaped = status
            return status
        }
        return nil
    }

    static func decode(_ status: Int32) -> Exit {
        let sig = status & 0x7f
        return sig == 0 ? .exited((status >> 8) & 0xff) : .signaled(sig)
    }

    deinit { if reaped == nil { kill() } }
}

/// Path of the running executable.
public func currentExecutablePath() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return CommandLine.arguments.first ?? "ringfence" }
    return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
