import Foundation
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

    /// serve-net and serve-xen-net take the same --metrics: two frontends are two
    /// connections and one reconnect; serve-xen-net counts the frames and bytes sent.
    @Test(arguments: [
        ["serve-net", "--loopback"], ["serve-xen-net", "--loopback"],
    ])
    func netServersCountConnections(server arguments: [String]) throws {
        let dir = "/tmp/rf-metrics-\(arguments[0])-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let name = arguments[0]
        let server = try Self.start(
            [name, "--socket", dir + "/s.sock", "--metrics", dir + "/m.sock"] + arguments.dropFirst(), log: dir + "/log"
        )
        defer {
            if server.isRunning { kill(server.processIdentifier, SIGKILL) }
            server.waitUntilExit()
        }
        Self.waitFor { FileManager.default.fileExists(atPath: dir + "/s.sock") }
        let client = name == "serve-net" ? "net" : "xen-net"
        for _ in 0..<2 {
            let r = try Interop.run([
                try Self.binary(), client, "--socket", dir + "/s.sock", "ping", "--count", "3", "--size", "100",
            ])
            #expect(r.status == 0, "\(r.output)")
        }
        var text = ""
        Self.waitFor {
            text = Self.scrape(unix: dir + "/m.sock")
            return Self.value(text, "ringfence_reconnects_total{server=\"\(name)\"}") == 1
        }
        #expect(Self.value(text, "ringfence_connections_total{server=\"\(name)\"}") == 2, "\(text)")
        if name == "serve-xen-net" {
            Self.waitFor {
                text = Self.scrape(unix: dir + "/m.sock")
                return Self.value(text, "ringfence_requests_total{server=\"serve-xen-net\",connection=\"2\"}") == 3
            }
            #expect(
                Self.value(text, "ringfence_written_bytes_total{server=\"serve-xen-net\",connection=\"2\"}") == 300,
                "\(text)")
        }
        kill(server.processIdentifier, SIGUSR1)
        Self.waitFor {
            ((try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? "").contains("metrics (SIGUSR1):")
        }
        let log = (try? String(contentsOfFile: dir + "/log", encoding: .utf8)) ?? ""
        #expect(log.contains("metrics (SIGUSR1):") && log.contains("ringfence_reconnects_total"), "\(log)")
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
