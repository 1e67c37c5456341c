import Foundation
import RingTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `serve-blk --metrics` and `serve-xen-blk --metrics` as an operator uses them: real
/// servers and real front-ends in child processes, the Prometheus text scraped over the
/// Unix socket or the loopback port, SIGUSR1 dumping the same counters to the log.
@Suite(.serialized)
struct MetricsTests {
    static func binary() throws -> String {
        try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
    }

    /// One HTTP GET over a connected stream socket; the body of the answer.
    static func get(_ fd: Int32) -> String {
        defer { close(fd) }
        let request = Array("GET /metrics HTTP/1.0\r\n\r\n".utf8)
        guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == request.count
        else { return "" }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            answer += chunk[0..<n]
        }
        let text = String(decoding: answer, as: UTF8.self)
        guard text.hasPrefix("HTTP/1.0 200 OK\r\n"), let end = text.range(of: "\r\n\r\n") else { return "" }
        return String(text[end.upperBound...])
    }

    static func scrape(unix path: String) -> String {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &a.sun_path) { p in
            for (i, b) in path.utf8.enumerated() { p[i] = b }
        }
        let rc = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            close(fd)
            return ""
        }
        return get(fd)
    }

    static func scrape(port: UInt16) -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let rc = withUnsafePointer(to: &a) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else {
            close(fd)
            return ""
        }
        return get(fd)
    }

    /// The value of one sample line (`name{labels} value`), nil when absent.
    static func value(_ text: String, _ sample: String) -> Int? {
        for line in text.split(separator: "\n") where line.hasPrefix(sample + " ") {
            return Int(line.dropFirst(sample.count + 1))
        }
        return nil
    }

    static func waitFor(_ what: () -> Bool) {
        let end = Date().addingTimeInterval(10)
        while !what() && Date() < end { usleep(10_000) }
    }

    /// Starts the server command `arguments` with `--socket DIR/s.sock --metrics DIR/m.sock`
    /// in a fresh directory, waits until it listens, runs `body` with the directory and the server, then
    /// kills the server and removes the directory.
    static func withServer(
        _ arguments: [String], tag: String, _ body: (_ dir: String, _ server: Process) throws -> Void
    ) throws {
        let dir = "/tmp/rf-metrics-\(tag)-\(arguments[0])-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try start(
            [arguments[0], "--socket", dir + "/s.sock", "--metrics", dir + "/m.sock"] + arguments.dropFirst(),
            log: dir + "/log")
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
            server.waitUntilExit()
        }
        ListeningSocket.wait(dir + "/s.sock", seconds: 10)
        try body(dir, server)
    }

    static func start(_ arguments: [String], log: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try binary())
        p.arguments = arguments
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        return p
    }

    @Test func serveBlkCountsEachConnectionAndDumpsOnSIGUSR1() throws {
        let dir = "/tmp/rf-metrics-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/d.img", contents: Data(count: 4 << 20)))
        let server = try Self.start(
            ["serve-blk", "--socket", dir + "/s.sock", "--image", dir + "/d.img", "--metrics", dir + "/m.sock"],
            log: dir + "/log")
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
        }
        Self.waitFor { FileManager.default.fileExists(atPath: dir + "/s.sock") }
        for _ in 0..<2 {
            let r = try Interop.run([try Self.binary(), "blk", "--socket", dir + "/s.sock", "verify", "--size", "64K"])
            #expect(r.status == 0, "\(r.output)")
        }
        let text = Self.scrape(unix: dir + "/m.sock")
        let c1 = "{server=\"serve-blk\",connection=\"1\"}"
        let c2 = "{server=\"serve-blk\",connection=\"2\"}"
        #expect(Self.value(text, "ringfence_connections_total{server=\"serve-blk\"}") == 2, "\(text)")
        #expect(Self.value(text, "ringfence_reconnects_total{server=\"serve-blk\"}") == 1)
        for c in [c1, c2] {
            #expect(Self.value(text, "ringfence_written_bytes_total" + c) == 65536, "\(text)")
            #expect(Self.value(text, "ringfence_read_bytes_total" + c) == 65536)
            #expect((Self.value(text, "ringfence_requests_total" + c) ?? 0) >= 2)
            #expect(Self.value(text, "ringfence_failed_requests_total" + c) == 0)
            #expect(Self.value(text, "ringfence_refusals_total" + c) == 0)
        }
        #expect(text.contains("# TYPE ringfence_requests_total counter"))
        kill(server.processIdentifier, SIGUSR1)
        Self.waitFor {
            ((try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? "").contains("ringfence_reconnects_total")
        }
        kill(server.processIdentifier, SIGTERM)
        server.waitUntilExit()
        #expect(server.terminationStatus == 0, "SIGUSR1 did not end the server; SIGTERM did, cleanly")
        let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
        #expect(log.contains("metrics (SIGUSR1):"), "\(log)")
        #expect(log.contains("ringfence_written_bytes_total\(c2) 65536"), "\(log)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/m.sock"), "the metrics socket is removed on exit")
    }

    /// `xen-blk audit` sends malformed requests, each on a fresh connection: the backend
    /// counts each rejection under the rule it broke, per connection, on a loopback port.
    @Test func serveXenBlkCountsViolationsByRuleOnALoopbackPort() throws {
        let dir = "/tmp/rf-metrics-xen-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/d.img", contents: Data(count: 4 << 20)))
        let server = try Self.start(
            ["serve-xen-blk", "--socket", dir + "/x.sock", "--image", dir + "/d.img", "--metrics", "127.0.0.1:0"],
            log: dir + "/log")
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
            server.waitUntilExit()
        }
        var port: UInt16?
        Self.waitFor {
            let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
            if let r = log.range(of: "metrics on 127.0.0.1:") {
                port = UInt16(log[r.upperBound...].prefix { $0.isNumber })
            }
            return port != nil && FileManager.default.fileExists(atPath: dir + "/x.sock")
        }
        let bound = try #require(port, "serve-xen-blk did not say where its metrics are")
        let audit = try Interop.run([try Self.binary(), "xen-blk", "--socket", dir + "/x.sock", "audit"])
        #expect(audit.status == 0, "\(audit.output)")
        let text = Self.scrape(port: bound)
        let connections = try #require(Self.value(text, "ringfence_connections_total{server=\"serve-xen-blk\"}"))
        #expect(connections >= 2, "\(text)")
        #expect(Self.value(text, "ringfence_reconnects_total{server=\"serve-xen-blk\"}") == connections - 1)
        let violations = text.split(separator: "\n").filter { $0.hasPrefix("ringfence_violations_total{") }
        #expect(violations.contains { $0.contains("rule=\"R3\"") }, "\(text)")
        #expect(violations.contains { $0.contains("rule=\"R7\"") }, "grant refs out of range or not granted")
        let rejected = violations.compactMap { Int($0.split(separator: " ").last ?? "") }.reduce(0, +)
        #expect(rejected >= connections - 1, "every audit connection was counted")
    }

    /// serve-xen-blk counts while a frontend is connected (not only when it leaves), and
    /// counts bytes: a scrape during a bench sees requests and bytes read; after it, the
    /// bytes of a verify are exact.
    @Test func serveXenBlkCountsLiveWithBytes() throws {
        let dir = "/tmp/rf-metrics-xenlive-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try Self.start(
            ["serve-xen-blk", "--socket", dir + "/x.sock", "--memory-sectors", "8192", "--metrics", dir + "/m.sock"],
            log: dir + "/log")
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
            server.waitUntilExit()
        }
        Self.waitFor { FileManager.default.fileExists(atPath: dir + "/x.sock") }
        let bench = try Self.start(
            ["xen-blk", "--socket", dir + "/x.sock", "bench", "--rw", "randread", "--runtime", "3"], log: dir + "/bench"
        )
        let c1 = "{server=\"serve-xen-blk\",connection=\"1\"}"
        var during = ""
        Self.waitFor {
            during = Self.scrape(unix: dir + "/m.sock")
            return (Self.value(during, "ringfence_read_bytes_total" + c1) ?? 0) > 0
        }
        #expect(bench.isRunning, "scraped while the frontend is connected")
        #expect((Self.value(during, "ringfence_requests_total" + c1) ?? 0) > 0, "\(during)")
        #expect((Self.value(during, "ringfence_read_bytes_total" + c1) ?? 0) % 4096 == 0)
        bench.waitUntilExit()
        #expect(bench.terminationStatus == 0)
        let verify = try Interop.run([
            try Self.binary(), "xen-blk", "--socket", dir + "/x.sock", "verify", "--size", "64k",
        ])
        #expect(verify.status == 0, "\(verify.output)")
        Self.waitFor {
            Self.value(Self.scrape(unix: dir + "/m.sock"), "ringfence_connections_total{server=\"serve-xen-blk\"}") == 2
        }
        let text = Self.scrape(unix: dir + "/m.sock")
        let c2 = "{server=\"serve-xen-blk\",connection=\"2\"}"
        #expect(Self.value(text, "ringfence_written_bytes_total" + c2) == 65536, "\(text)")
        #expect(Self.value(text, "ringfence_read_bytes_total" + c2) == 65536)
        #expect(Self.value(text, "ringfence_written_bytes_total" + c1) == 0)
        #expect(Self.value(text, "ringfence_reconnects_total{server=\"serve-xen-blk\"}") == 1)
    }

    /// serve-net and serve-xen-net take the same --metrics and count the same way: per
    /// connection, the frames and bytes the front-end transmitted (tx) and received (rx).
    /// A ping of 3 frames of 100 bytes on a loopback is 3 frames and 300 bytes each way; a
    /// second front-end sending 5 frames of 200 bytes is the second connection (one
    /// reconnect) with 5 frames and 1000 bytes on tx.
    @Test(arguments: [
        ["serve-net", "--loopback"], ["serve-xen-net", "--loopback"],
    ])
    func netServersCountFramesAndBytesEachWay(server arguments: [String]) throws {
        let name = arguments[0]
        try Self.withServer(arguments, tag: "net") { dir, server in
            let client = name == "serve-net" ? "net" : "xen-net"
            let ping = try Interop.run([
                try Self.binary(), client, "--socket", dir + "/s.sock", "ping", "--count", "3", "--size", "100",
            ])
            #expect(ping.status == 0, "\(ping.output)")
            let c1 = "{server=\"\(name)\",connection=\"1\"}"
            let c2 = "{server=\"\(name)\",connection=\"2\"}"
            var text = ""
            // serve-xen-net adds a connection's counts when it ends (the frontend's close).
            Self.waitFor {
                text = Self.scrape(unix: dir + "/m.sock")
                return Self.value(text, "ringfence_rx_frames_total" + c1) == 3
            }
            #expect(Self.value(text, "ringfence_tx_frames_total" + c1) == 3, "\(text)")
            #expect(Self.value(text, "ringfence_tx_bytes_total" + c1) == 300)
            #expect(Self.value(text, "ringfence_rx_frames_total" + c1) == 3)
            #expect(Self.value(text, "ringfence_rx_bytes_total" + c1) == 300)
            #expect(Self.value(text, "ringfence_rx_dropped_frames_total" + c1) == 0)
            #expect(Self.value(text, "ringfence_refusals_total" + c1) == 0)
            #expect(!text.contains("ringfence_violations_total{server=\"\(name)\""), "no rule broken: \(text)")
            #expect(text.contains("# TYPE ringfence_tx_frames_total counter"))
            if name == "serve-net" {
                let send = try Interop.run([
                    try Self.binary(), client, "--socket", dir + "/s.sock", "send", "--count", "5", "--size", "200",
                ])
                #expect(send.status == 0, "\(send.output)")
            } else {
                let bench = try Interop.run([
                    try Self.binary(), client, "--socket", dir + "/s.sock", "ping", "--count", "5", "--size", "200",
                ])
                #expect(bench.status == 0, "\(bench.output)")
            }
            Self.waitFor {
                text = Self.scrape(unix: dir + "/m.sock")
                return Self.value(text, "ringfence_tx_frames_total" + c2) == 5
            }
            #expect(Self.value(text, "ringfence_connections_total{server=\"\(name)\"}") == 2, "\(text)")
            #expect(Self.value(text, "ringfence_reconnects_total{server=\"\(name)\"}") == 1)
            #expect(Self.value(text, "ringfence_tx_bytes_total" + c2) == 1000)
            #expect(
                Self.value(text, "ringfence_tx_frames_total" + c1) == 3, "the first connection's counts stay its own")
            kill(server.processIdentifier, SIGUSR1)
            Self.waitFor {
                ((try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? "").contains(
                    "ringfence_tx_bytes_total")
            }
            let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
            #expect(log.contains("metrics (SIGUSR1):"), "\(log)")
            #expect(log.contains("ringfence_tx_bytes_total\(c2) 1000"), "\(log)")
        }
    }

    /// Both net servers count while a front-end is connected, not only when it leaves: a
    /// scrape during a 2-second bench of 1500-byte frames sees frames, and exactly 1500
    /// bytes for each (frames and bytes move to the counters together).
    @Test(arguments: [
        ["serve-net", "--loopback"], ["serve-xen-net", "--loopback"],
    ])
    func netServersCountLive(server arguments: [String]) throws {
        let name = arguments[0]
        try Self.withServer(arguments, tag: "live") { dir, _ in
            let client =
                name == "serve-net"
                ? ["net", "--socket", dir + "/s.sock", "bench", "--both"]
                : ["xen-net", "--socket", dir + "/s.sock", "bench"]
            let bench = try Self.start(client + ["--size", "1500", "--runtime", "2"], log: dir + "/bench")
            defer {
                if bench.isRunning { kill(bench.processIdentifier, SIGKILL) }
                bench.waitUntilExit()
            }
            let c1 = "{server=\"\(name)\",connection=\"1\"}"
            var during = ""
            Self.waitFor {
                during = Self.scrape(unix: dir + "/m.sock")
                return (Self.value(during, "ringfence_tx_frames_total" + c1) ?? 0) > 0
            }
            #expect(bench.isRunning, "scraped while the front-end is connected")
            let frames = try #require(Self.value(during, "ringfence_tx_frames_total" + c1), "\(during)")
            #expect(frames > 0)
            #expect(Self.value(during, "ringfence_tx_bytes_total" + c1) == frames * 1500, "\(during)")
        }
    }

    /// serve-net with two sockets: connections are numbered across both, each counted on
    /// its own device (a frame sent through the second socket is not the first's).
    @Test func serveNetNumbersConnectionsAcrossSockets() throws {
        let dir = "/tmp/rf-metrics-net2-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try Self.start(
            [
                "serve-net", "--socket", dir + "/a.sock", "--socket", dir + "/b.sock", "--sink", "--metrics",
                dir + "/m.sock",
            ], log: dir + "/log")
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
            server.waitUntilExit()
        }
        ListeningSocket.wait(dir + "/a.sock", seconds: 10)
        ListeningSocket.wait(dir + "/b.sock", seconds: 10)
        for (socket, count) in [("a", 2), ("b", 7)] {
            let r = try Interop.run([
                try Self.binary(), "net", "--socket", dir + "/\(socket).sock", "send", "--count", "\(count)", "--size",
                "64",
            ])
            #expect(r.status == 0, "\(r.output)")
        }
        var text = ""
        Self.waitFor {
            text = Self.scrape(unix: dir + "/m.sock")
            return Self.value(text, "ringfence_tx_frames_total{server=\"serve-net\",connection=\"2\"}") == 7
        }
        #expect(Self.value(text, "ringfence_tx_frames_total{server=\"serve-net\",connection=\"1\"}") == 2, "\(text)")
        #expect(Self.value(text, "ringfence_tx_bytes_total{server=\"serve-net\",connection=\"2\"}") == 7 * 64)
        #expect(Self.value(text, "ringfence_connections_total{server=\"serve-net\"}") == 2)
    }

    /// serve-fs counts requests by opcode class and the file bytes moved: a put of a
    /// 60000-byte file is one WRITE of 60000 bytes, a get of it reads exactly 60000 bytes;
    /// each connection starts with one INIT (class session); nothing fails.
    @Test func serveFsCountsRequestsByClassAndBytes() throws {
        let dir = "/tmp/rf-metrics-fs-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir + "/share", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let data = Data((0..<60000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try data.write(to: URL(fileURLWithPath: dir + "/local.bin"))
        let server = try Self.start(
            ["serve-fs", "--socket", dir + "/f.sock", "--dir", dir + "/share", "--metrics", "127.0.0.1:0"],
            log: dir + "/log")
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
            server.waitUntilExit()
        }
        var port: UInt16?
        Self.waitFor {
            let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
            if let r = log.range(of: "metrics on 127.0.0.1:") {
                port = UInt16(log[r.upperBound...].prefix { $0.isNumber })
            }
            return port != nil
        }
        let bound = try #require(port, "serve-fs did not say where its metrics are")
        ListeningSocket.wait(dir + "/f.sock", seconds: 10)
        let fs = [try Self.binary(), "fs", "--socket", dir + "/f.sock"]
        let put = try Interop.run(fs + ["put", dir + "/local.bin", "/a.bin"])
        #expect(put.status == 0, "\(put.output)")
        let get = try Interop.run(fs + ["get", "/a.bin", dir + "/back.bin"])
        #expect(get.status == 0, "\(get.output)")
        #expect(FileManager.default.contents(atPath: dir + "/back.bin") == data)
        var text = ""
        Self.waitFor {
            text = Self.scrape(port: bound)
            return Self.value(text, "ringfence_read_bytes_total{server=\"serve-fs\",connection=\"2\"}") == 60000
        }
        func value(_ name: String, _ connection: Int, _ kind: String? = nil) -> Int? {
            let labels = "server=\"serve-fs\",connection=\"\(connection)\"" + (kind.map { ",class=\"\($0)\"" } ?? "")
            return Self.value(text, "\(name){\(labels)}")
        }
        #expect(value("ringfence_written_bytes_total", 1) == 60000, "\(text)")
        #expect(value("ringfence_read_bytes_total", 1) == 0)
        #expect(value("ringfence_requests_total", 1, "write") == 1)
        #expect(value("ringfence_requests_total", 1, "read") == 0)
        #expect(value("ringfence_read_bytes_total", 2) == 60000)
        #expect(value("ringfence_written_bytes_total", 2) == 0)
        #expect(value("ringfence_requests_total", 2, "write") == 0)
        #expect((value("ringfence_requests_total", 2, "read") ?? 0) >= 1)
        for c in [1, 2] {
            #expect(value("ringfence_requests_total", c, "session") == 1, "one INIT per connection")
            #expect(value("ringfence_requests_total", c, "other") == 0)
            #expect(value("ringfence_failed_requests_total", c) == 0)
            #expect(value("ringfence_refusals_total", c) == 0)
        }
        #expect(Self.value(text, "ringfence_reconnects_total{server=\"serve-fs\"}") == 1)
        kill(server.processIdentifier, SIGUSR1)
        Self.waitFor {
            ((try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? "").contains("ringfence_read_bytes_total")
        }
        let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
        #expect(log.contains("ringfence_written_bytes_total{server=\"serve-fs\",connection=\"1\"} 60000"), "\(log)")
    }

    @Test func metricsAreNeverServedBeyondTheLoopback() throws {
        for address in ["0.0.0.0:9100", "192.168.1.1:9100", "metrics"] {
            let r = try Interop.run([
                try Self.binary(), "serve-blk", "--socket", "/tmp/unused.sock", "--image", "/tmp/unused.img",
                "--metrics", address,
            ])
            #expect(r.status == 2, "usage error: \(r.output)")
            #expect(r.output.contains("--metrics \(address)"), "\(r.output)")
        }
    }
}
