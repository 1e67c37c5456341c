public import SharedMemory

#if canImport(Glibc)
import Glibc
#endif

/// The `ringfence` executable SwiftPM built next to the running test bundle.
public func ringfenceBinary() -> String? {
    let me = currentExecutablePath()
    guard let slash = me.lastIndex(of: "/") else { return nil }
    var dir = String(me[..<slash])
    for _ in 0..<3 {
        let candidate = dir + "/ringfence"
        if access(candidate, X_OK) == 0 { return candidate }
        guard let s = dir.lastIndex(of: "/") else { break }
        dir = String(dir[..<s])
    }
    return nil
}

/// A `ringfence serve-*` in a child process, listening on its socket: the real server of
/// the tests that drive one (wait strategies, idle CPU, a back-end that dies). Its output
/// goes to /dev/null; `stop()` (or deinit) ends it and removes the socket.
public final class RingfenceServer {
    /// The server's process.
    public let process: ChildProcess
    /// The socket the server was told to serve on.
    public let socket: String
    private var stopped = false

    /// Why a server did not start.
    public enum StartError: Error, CustomStringConvertible {
        /// No `ringfence` executable next to the tests.
        case notBuilt
        /// Nothing listened on the socket within 30 s.
        case notListening(String)
        /// The server ended before it listened.
        case exited(ChildProcess.Exit)
        public var description: String {
            switch self {
            case .notBuilt: return "the ringfence executable is not built next to the tests (swift build)"
            case .notListening(let s): return "the server did not listen on \(s) within 30 s"
            case .exited(let e): return "the server \(e) before it listened"
            }
        }
    }

    /// Starts `ringfence arguments`, which must serve on `socket`, and returns once a
    /// socket is listening there (`ListeningSocket`, not the file: a stale file lies).
    public init(_ arguments: [String], socket: String) throws {
        guard let binary = ringfenceBinary() else { throw StartError.notBuilt }
        let null = open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { if null >= 0 { close(null) } }
        process = try ChildProcess(executable: binary, arguments: arguments, stdout: null >= 0 ? null : nil)
        self.socket = socket
        let deadline = Deadline.after(seconds: 30)
        while !ListeningSocket.isListening(socket) {
            if let exit = process.wait(until: .now) {
                stopped = true
                throw StartError.exited(exit)
            }
            if deadline.hasPassed {
                stop()
                throw StartError.notListening(socket)
            }
            usleep(5_000)
        }
    }

    /// The server's process id.
    public var pid: Int32 { process.pid }

    /// SIGTERM, up to 5 s for an orderly exit, then SIGKILL; reaps and removes the socket.
    public func stop() {
        guard !stopped else { return }
        stopped = true
        if process.wait(until: .now) == nil {
            _ = kill(process.pid, SIGTERM)
            if process.wait(until: .after(seconds: 5)) == nil { process.kill() }
        }
        unlink(socket)
    }

    deinit { stop() }

    /// What a server costs while idle behind a connected front-end, with the default wait
    /// strategy and with `--poll`: for each, starts `ringfence arguments (+ --poll)`
    /// serving on `socket`, lets `frontEnd` connect and make one request (it returns how to
    /// disconnect, done after the measurement), waits 200 ms (past any spin), and watches
    /// the server for 2 s.
    public static func idleLoads(
        _ arguments: [String], socket: String, frontEnd: () throws -> () -> Void
    ) throws -> (adaptive: ProcessLoad, polling: ProcessLoad) {
        func idleLoad(_ wait: [String]) throws -> ProcessLoad {
            let server = try RingfenceServer(arguments + wait, socket: socket)
            defer { server.stop() }
            let disconnect = try frontEnd()
            defer { disconnect() }
            usleep(200_000)  // past any spin
            return ProcessLoad.measure(server.pid, seconds: 2)
        }
        return (try idleLoad([]), try idleLoad(["--poll"]))
    }
}
