import ArgumentParser
import Foundation
import Metrics
import Prometheus
import SharedMemory
import Synchronization
import VhostUser
import VirtioBlock

#if canImport(Glibc)
import Glibc
#endif

/// Where `--metrics` serves the Prometheus text format: a Unix socket, or a TCP port on the
/// loopback address only (the counters say what a peer did; they are not for the network).
enum MetricsAddress: Equatable, CustomStringConvertible {
    case unix(String)
    case loopback(port: UInt16)

    /// `unix:PATH` or a path with a `/`; `127.0.0.1:PORT`, `localhost:PORT` or `:PORT`.
    init(parsing text: String) throws(ValidationError) {
        if text.hasPrefix("unix:") {
            self = .unix(String(text.dropFirst(5)))
            return
        }
        if let colon = text.lastIndex(of: ":"), !text.contains("/") {
            let host = text[..<colon]
            guard ["", "127.0.0.1", "localhost"].contains(host) else {
                throw ValidationError("--metrics \(text): only a Unix socket or a loopback port (127.0.0.1:PORT)")
            }
            guard let port = UInt16(text[text.index(after: colon)...]) else {
                throw ValidationError("--metrics \(text): the port must be 0...65535")
            }
            self = .loopback(port: port)
            return
        }
        guard text.contains("/") else {
            throw ValidationError("--metrics \(text): give a socket path (with a /) or 127.0.0.1:PORT")
        }
        self = .unix(text)
    }

    var description: String {
        switch self {
        case .unix(let path): return "unix:\(path)"
        case .loopback(let port): return "127.0.0.1:\(port)"
        }
    }
}

/// The counters a server operator reads (issue 19), through swift-metrics into a Prometheus
/// registry: per connection, requests, bytes, failed requests, violations by rule and
/// refusals; per server, connections and reconnects. `text` is the exposition format that
/// `--metrics` serves and SIGUSR1 logs.
final class ServerMetrics: Sendable {
    /// swift-metrics can be bootstrapped once per process.
    static let registry: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return registry
    }()

    struct State {
        var connection: Int?
        var baseline = BlockDeviceStatistics()
        var connections = 0
    }
    let state = Mutex(State())
    let server: String
    /// A live source of counts (serve-blk's device); nil when the caller adds them itself.
    let source: BlockDeviceCounters?

    init(server: String, source: BlockDeviceCounters? = nil) {
        _ = Self.registry
        self.server = server
        self.source = source
        Counter(label: "ringfence_connections_total", dimensions: [("server", server)]).increment(by: 0)
        Counter(label: "ringfence_reconnects_total", dimensions: [("server", server)]).increment(by: 0)
    }

    func dimensions(_ connection: Int, _ extra: [(String, String)] = []) -> [(String, String)] {
        [("server", server), ("connection", "\(connection)")] + extra
    }

    /// A front-end connected: counts it (a reconnect after the first) and starts its counters.
    func connected(_ connection: Int) {
        sync()
        state.withLock { s in
            s.connections += 1
            s.connection = connection
            if let source { s.baseline = source.snapshot }
            Counter(label: "ringfence_connections_total", dimensions: [("server", server)]).increment()
            if s.connections > 1 {
                Counter(label: "ringfence_reconnects_total", dimensions: [("server", server)]).increment()
            }
        }
        add(BlockDeviceStatistics(), connection: connection)
    }

    func disconnected() {
        sync()
        state.withLock { $0.connection = nil }
    }

    /// The current connection (or `connection`) broke a rule: a queue failed, a ring was dropped.
    func violation(_ rule: Rule, connection: Int? = nil) {
        guard let c = connection ?? state.withLock({ $0.connection }) else { return }
        Counter(label: "ringfence_violations_total", dimensions: dimensions(c, [("rule", rule.rawValue)])).increment()
    }

    /// A control request of `connection` was refused.
    func refused(connection: Int) {
        Counter(label: "ringfence_refusals_total", dimensions: dimensions(connection)).increment()
    }

    /// Adds counts to a connection's counters (created at zero, so a scrape shows them).
    func add(_ d: BlockDeviceStatistics, connection c: Int) {
        Counter(label: "ringfence_requests_total", dimensions: dimensions(c)).increment(by: Int64(d.requests))
        Counter(label: "ringfence_read_bytes_total", dimensions: dimensions(c)).increment(by: Int64(d.bytesRead))
        Counter(label: "ringfence_written_bytes_total", dimensions: dimensions(c)).increment(by: Int64(d.bytesWritten))
        Counter(label: "ringfence_failed_requests_total", dimensions: dimensions(c)).increment(by: Int64(d.failed))
        Counter(label: "ringfence_refusals_total", dimensions: dimensions(c)).increment(by: 0)
        for (rule, n) in d.violations.sorted(by: { $0.key < $1.key }) {
            Counter(label: "ringfence_violations_total", dimensions: dimensions(c, [("rule", rule)]))
                .increment(by: Int64(n))
        }
    }

    /// Moves what the live source counted since the last sync to the current connection.
    func sync() {
        guard let source else { return }
        let (connection, delta): (Int?, BlockDeviceStatistics) = state.withLock { s in
            let now = source.snapshot
            var d = BlockDeviceStatistics(
                requests: now.requests - s.baseline.requests, bytesRead: now.bytesRead - s.baseline.bytesRead,
                bytesWritten: now.bytesWritten - s.baseline.bytesWritten, failed: now.failed - s.baseline.failed)
            for (rule, n) in now.violations where n != s.baseline.violations[rule, default: 0] {
                d.violations[rule] = n - s.baseline.violations[rule, default: 0]
            }
            s.baseline = now
            return (s.connection, d)
        }
        if let connection { add(delta, connection: connection) }
    }

    /// The Prometheus text exposition of every counter.
    var text: String {
        sync()
        return Self.registry.emitToString()
    }
}

/// `--metrics ADDR`, the same option on every server; SIGUSR1 logs the same text.
struct MetricsOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics at ADDR: a Unix socket path or 127.0.0.1:PORT (SIGUSR1 logs them too).",
            valueName: "addr"))
    var metrics: String?

    func validate() throws {
        if let metrics { _ = try MetricsAddress(parsing: metrics) }
    }

    /// The endpoint, when asked for; `log` is told where it listens.
    func start(_ serverMetrics: ServerMetrics, log: (String) -> Void) throws -> MetricsEndpoint? {
        guard let metrics else { return nil }
        let endpoint = try MetricsEndpoint(try MetricsAddress(parsing: metrics), metrics: serverMetrics)
        log("metrics on \(endpoint.bound)")
        return endpoint
    }
}

extension ServerMetrics {
    /// What a vhost-user back-end's event means for the counters (serve-blk, serve-net, serve-fs).
    func record(_ event: BackendEvent) {
        switch event {
        case .connected(let c): connected(c)
        case .disconnected: disconnected()
        case .rejected(let c, _, _): refused(connection: c)
        case .queueFailed(_, let v): violation(v.rule)
        default: break
        }
    }
}

/// Serves `metrics.text` to whoever connects to `address` (one short HTTP/1.0 answer per
/// connection, whatever was asked), on a thread of its own until the process exits.
final class MetricsEndpoint: Sendable {
    let fd: Int32
    let address: MetricsAddress
    /// The port actually bound (for `127.0.0.1:0`).
    let port: UInt16

    init(_ address: MetricsAddress, metrics: ServerMetrics) throws {
        self.address = address
        let sock: Int32
        switch address {
        case .unix(let path):
            var st = stat()
            if lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK { unlink(path) }
            var a = sockaddr_un()
            a.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: a.sun_path) else {
                throw ValidationError("--metrics: socket path too long")
            }
            withUnsafeMutableBytes(of: &a.sun_path) { p in
                for (i, b) in bytes.enumerated() { p[i] = b }
            }
            sock = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard sock >= 0 else { throw ValidationError("--metrics: socket() failed: errno \(errno)") }
            let rc = withUnsafePointer(to: &a) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(sock, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
            guard rc == 0 else {
                close(sock)
                throw ValidationError("--metrics: cannot bind \(path): errno \(errno)")
            }
            self.port = 0
        case .loopback(let wanted):
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = wanted.bigEndian
            a.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
            sock = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard sock >= 0 else { throw ValidationError("--metrics: socket() failed: errno \(errno)") }
            var one: Int32 = 1
            _ = setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            let rc = withUnsafePointer(to: &a) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(sock, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard rc == 0 else {
                close(sock)
                throw ValidationError("--metrics: cannot bind 127.0.0.1:\(wanted): errno \(errno)")
            }
            var bound = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &bound) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(sock, $0, &length) }
            }
            self.port = UInt16(bigEndian: bound.sin_port)
        }
        self.fd = sock
        guard listen(sock, 16) == 0 else {
            close(sock)
            throw ValidationError("--metrics: listen() failed: errno \(errno)")
        }
        let fd = self.fd
        let thread = Thread {
            while true {
                let client = accept(fd, nil, nil)
                if client < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return
                }
                Self.answer(client, body: metrics.text)
                close(client)
            }
        }
        thread.stackSize = 1 << 20
        thread.start()
    }

    /// The address a user scrapes.
    var bound: String {
        switch address {
        case .unix(let path): return "unix:\(path)"
        case .loopback: return "127.0.0.1:\(port)"
        }
    }

    func removeSocket() {
        if case .unix(let path) = address { unlink(path) }
    }

    /// Reads the request (at most 4 KiB, 1 s; its content does not matter) and answers.
    static func answer(_ client: Int32, body: String) {
        var timeout = timeval(tv_sec: 1, tv_usec: 0)
        _ = setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request = [UInt8](repeating: 0, count: 4096)
        _ = request.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
        let payload = Array(body.utf8)
        let head =
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            + "Content-Length: \(payload.count)\r\nConnection: close\r\n\r\n"
        var all = Array(head.utf8) + payload
        var sent = 0
        while sent < all.count {
            let n = all.withUnsafeMutableBytes { p -> Int in
                guard let base = p.baseAddress else { return -1 }
                return send(client, base + sent, p.count - sent, Int32(MSG_NOSIGNAL))
            }
            if n <= 0 { return }
            sent += n
        }
    }
}
