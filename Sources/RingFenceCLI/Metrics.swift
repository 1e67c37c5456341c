import ArgumentParser
import Foundation
import Metrics
import Prometheus
import SharedMemory
import Synchronization
import VhostUser
import VirtioBlock
import VirtioFS
import VirtioNet

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

/// One counter of a connection, beyond its `server` and `connection` labels: the
/// metric's name and any further labels (`rule`, `class`).
struct CounterKey: Hashable, Sendable {
    var name: String
    var labels: [String]

    init(_ name: String, _ labels: (String, String)...) {
        self.name = name
        self.labels = labels.flatMap { [$0.0, $0.1] }
    }

    var pairs: [(String, String)] {
        stride(from: 0, to: labels.count - 1, by: 2).map { (labels[$0], labels[$0 + 1]) }
    }

    var order: String { ([name] + labels).joined(separator: "\u{0}") }
}

/// Counts by counter, as a live source reports them (totals since it was made).
typealias CounterValues = [CounterKey: Int]

extension CounterValues {
    /// The counters of a block server (serve-blk, serve-xen-blk).
    init(_ d: BlockDeviceStatistics) {
        self = [
            CounterKey("ringfence_requests_total"): d.requests,
            CounterKey("ringfence_read_bytes_total"): d.bytesRead,
            CounterKey("ringfence_written_bytes_total"): d.bytesWritten,
            CounterKey("ringfence_failed_requests_total"): d.failed,
        ]
        for (rule, n) in d.violations { self[CounterKey("ringfence_violations_total", ("rule", rule))] = n }
    }

    /// The counters of a net server: frames and bytes each way, as the front-end names its
    /// queues (tx: it transmitted them, rx: it received them), and frames dropped for want
    /// of receive buffers.
    static func net(
        txFrames: Int, txBytes: Int, rxFrames: Int, rxBytes: Int, rxDropped: Int, violations: [String: Int]
    ) -> CounterValues {
        var v: CounterValues = [
            CounterKey("ringfence_tx_frames_total"): txFrames, CounterKey("ringfence_tx_bytes_total"): txBytes,
            CounterKey("ringfence_rx_frames_total"): rxFrames, CounterKey("ringfence_rx_bytes_total"): rxBytes,
            CounterKey("ringfence_rx_dropped_frames_total"): rxDropped,
        ]
        for (rule, n) in violations { v[CounterKey("ringfence_violations_total", ("rule", rule))] = n }
        return v
    }

    /// The counters of serve-fs: requests by class, file bytes read and written, failures.
    init(_ d: FSDeviceStatistics) {
        self = [
            CounterKey("ringfence_read_bytes_total"): d.bytesRead,
            CounterKey("ringfence_written_bytes_total"): d.bytesWritten,
            CounterKey("ringfence_failed_requests_total"): d.failed,
        ]
        for kind in FSRequestClass.allCases {
            self[CounterKey("ringfence_requests_total", ("class", kind.rawValue))] = d.requests[kind, default: 0]
        }
        for (rule, n) in d.violations { self[CounterKey("ringfence_violations_total", ("rule", rule))] = n }
    }
}

/// The counters a server operator reads (issue 19), through swift-metrics into a Prometheus
/// registry: per connection, what the server's kind counts (requests and bytes for block,
/// frames and bytes each way for net, requests by class and bytes for fs), violations by
/// rule and refusals; per server, connections and reconnects. `text` is the exposition
/// format that `--metrics` serves and SIGUSR1 logs.
///
/// A server with several sockets (serve-net) has one port per socket, each with its own
/// live source; connections are numbered across all of them, in the order they came.
final class ServerMetrics: Sendable {
    /// swift-metrics can be bootstrapped once per process.
    static let registry: PrometheusCollectorRegistry = {
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        return registry
    }()

    struct Port {
        /// The label of the connection being served.
        var connection: Int?
        var baseline: CounterValues = [:]
    }

    struct State {
        var ports: [Port]
        var connections = 0
    }
    let state: Mutex<State>
    let server: String
    /// Live sources of counts, one per port (nil when the caller adds them itself).
    let sources: [(@Sendable () -> CounterValues)?]
    /// Counters every connection shows from its start, at zero until something is counted.
    let zeros: [CounterKey]

    static let blockCounters = [
        "ringfence_requests_total", "ringfence_read_bytes_total", "ringfence_written_bytes_total",
        "ringfence_failed_requests_total",
    ].map { CounterKey($0) }
    static let netCounters = [
        "ringfence_tx_frames_total", "ringfence_tx_bytes_total", "ringfence_rx_frames_total",
        "ringfence_rx_bytes_total", "ringfence_rx_dropped_frames_total",
    ].map { CounterKey($0) }
    static let fsCounters = Array(CounterValues(FSDeviceStatistics()).keys)

    init(server: String, zeros: [CounterKey] = blockCounters, sources: [(@Sendable () -> CounterValues)?] = [nil]) {
        _ = Self.registry
        self.server = server
        self.zeros = zeros.sorted { $0.order < $1.order }
        let sources = sources.isEmpty ? [nil] : sources
        self.sources = sources
        state = Mutex(State(ports: Array(repeating: Port(), count: sources.count)))
        Counter(label: "ringfence_connections_total", dimensions: [("server", server)]).increment(by: 0)
        Counter(label: "ringfence_reconnects_total", dimensions: [("server", server)]).increment(by: 0)
    }

    /// serve-blk: its device's counters.
    convenience init(server: String, source: BlockDeviceCounters) {
        self.init(server: server, sources: [{ CounterValues(source.snapshot) }])
    }

    func dimensions(_ connection: Int, _ extra: [(String, String)] = []) -> [(String, String)] {
        [("server", server), ("connection", "\(connection)")] + extra
    }

    /// A front-end connected to `port` (labelled `connection`, or the next number when
    /// nil): counts it (a reconnect after the first) and starts its counters. Returns
    /// its label.
    @discardableResult
    func connected(_ connection: Int? = nil, port: Int = 0) -> Int {
        sync()
        let label = state.withLock { s -> Int in
            s.connections += 1
            let label = connection ?? s.connections
            s.ports[port].connection = label
            if let source = sources[port] { s.ports[port].baseline = source() }
            Counter(label: "ringfence_connections_total", dimensions: [("server", server)]).increment()
            if s.connections > 1 {
                Counter(label: "ringfence_reconnects_total", dimensions: [("server", server)]).increment()
            }
            return label
        }
        add([:], connection: label)
        return label
    }

    func disconnected(port: Int = 0) {
        sync()
        state.withLock { $0.ports[port].connection = nil }
    }

    /// The current connection of `port` (or `connection`) broke a rule: a queue failed, a
    /// ring was dropped.
    func violation(_ rule: Rule, connection: Int? = nil, port: Int = 0) {
        guard let c = connection ?? state.withLock({ $0.ports[port].connection }) else { return }
        Counter(label: "ringfence_violations_total", dimensions: dimensions(c, [("rule", rule.rawValue)])).increment()
    }

    /// A control request of `connection` was refused.
    func refused(connection: Int) {
        Counter(label: "ringfence_refusals_total", dimensions: dimensions(connection)).increment()
    }

    /// Adds counts to a connection's counters (the server's zeros created first, so a
    /// scrape shows them).
    func add(_ values: CounterValues, connection c: Int) {
        for key in zeros where values[key] == nil {
            Counter(label: key.name, dimensions: dimensions(c, key.pairs)).increment(by: 0)
        }
        Counter(label: "ringfence_refusals_total", dimensions: dimensions(c)).increment(by: 0)
        for (key, n) in values.sorted(by: { $0.key.order < $1.key.order }) {
            Counter(label: key.name, dimensions: dimensions(c, key.pairs)).increment(by: Int64(n))
        }
    }

    func add(_ d: BlockDeviceStatistics, connection c: Int) { add(CounterValues(d), connection: c) }

    /// Moves what the live sources counted since the last sync to their current connections.
    func sync() {
        let deltas: [(Int, CounterValues)] = state.withLock { s in
            var result: [(Int, CounterValues)] = []
            for (i, source) in sources.enumerated() {
                guard let source else { continue }
                let now = source()
                var d: CounterValues = [:]
                for (key, n) in now where n != s.ports[i].baseline[key, default: 0] {
                    d[key] = n - s.ports[i].baseline[key, default: 0]
                }
                s.ports[i].baseline = now
                if let c = s.ports[i].connection, !d.isEmpty { result.append((c, d)) }
            }
            return result
        }
        for (c, d) in deltas { add(d, connection: c) }
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
    /// What a vhost-user back-end's event means for the counters of `port` (serve-blk,
    /// serve-net, serve-fs): connections are numbered across the server's ports.
    func record(_ event: BackendEvent, port: Int = 0) {
        switch event {
        case .connected: connected(port: port)
        case .disconnected: disconnected(port: port)
        case .rejected:
            if let c = state.withLock({ $0.ports[port].connection }) { refused(connection: c) }
        case .queueFailed(_, let v): violation(v.rule, port: port)
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

/// A device a metrics source reads, made after the metrics (it needs their event handler).
final class LateBound<Value: Sendable>: Sendable {
    let value = Mutex<Value?>(nil)
    func set(_ v: Value) { value.withLock { $0 = v } }
    var current: Value? { value.withLock { $0 } }
}

extension VirtioNetDevice {
    var counterValues: CounterValues {
        let s = statistics
        return .net(
            txFrames: Int(clamping: s.transmitted), txBytes: Int(clamping: s.transmittedBytes),
            rxFrames: Int(clamping: s.received), rxBytes: Int(clamping: s.receivedBytes),
            rxDropped: Int(clamping: s.receiveDropped), violations: s.violations.mapValues { Int(clamping: $0) })
    }
}
