import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioNet

/// Server mode (`VirtioNetDriver.listen`): the driver listens and the back-end connects,
/// as DPDK's net_vhost does with client=1. The accept has a deadline, the path is gone
/// once the wait ends, and a back-end that connects and misbehaves fails as in client mode.
@Suite(.serialized) struct NetListenTests {
    static func socketPath() throws -> (directory: String, socket: String) {
        let d = NSTemporaryDirectory() + "rf-netlisten-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return (d, d + "/drv.sock")
    }

    /// Connects to `path` as soon as it exists (the driver may not be listening yet).
    static func connectWhenListening(_ path: String, seconds: Double = 5) -> UnixChannel? {
        let deadline = Deadline.after(seconds: seconds)
        while !deadline.hasPassed {
            if let c = try? UnixChannel.connect(path: path, until: .after(seconds: 1)) { return c }
            usleep(5_000)
        }
        return nil
    }

    /// Runs `listen` on its own thread; the result arrives on the returned box.
    final class Listening: @unchecked Sendable {
        let done = DispatchSemaphore(value: 0)
        var result: Result<VirtioNetDriver, NetError>?
        var seconds = 0.0

        init(socket: String, options: VirtioNetDriver.Options) {
            Thread.detachNewThread {
                let start = Date()
                do throws(NetError) {
                    self.result = .success(try VirtioNetDriver.listen(socket: socket, options: options))
                } catch {
                    self.result = .failure(error)
                }
                self.seconds = Date().timeIntervalSince(start)
                self.done.signal()
            }
        }

        func wait(seconds: Double = 20) -> Result<VirtioNetDriver, NetError>? {
            done.wait(timeout: .now() + seconds) == .success ? result : nil
        }
    }

    @Test func backEndThatConnectsIsNegotiatedAndFramesComeBack() throws {
        let (dir, socket) = try Self.socketPath()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = VirtioNetDriver.Options()
        options.acceptTimeout = 10
        let listening = Listening(socket: socket, options: options)
        let device = VirtioNetDevice(fabric: NetFabric(mode: .loopback), options: VirtioNetDeviceOptions())
        var configuration = Backend.Configuration()
        configuration.pollInterval = 0.05
        let backend = Backend(device: device, configuration: configuration)
        let channel = try #require(Self.connectWhenListening(socket))
        let served = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            backend.serve(channel)
            served.signal()
        }
        let net = try #require(try listening.wait()?.get())
        #expect(!FileManager.default.fileExists(atPath: socket), "the socket is removed once a back-end is accepted")
        let r = try NetTraffic.ping(
            net.pair(0), mac: net.info.mac, dst: [0x02, 0, 0, 0, 0, 1], size: 200, count: 20, timeout: 5)
        #expect(r.received == 20 && r.mismatched == 0, "\(r)")
        #expect(net.failure == nil)
        net.close()
        backend.stop()
        #expect(served.wait(timeout: .now() + 10) == .success)
    }

    @Test func noBackEndWithinTheAcceptTimeoutIsATimeoutAndTheSocketIsRemoved() throws {
        let (dir, socket) = try Self.socketPath()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = VirtioNetDriver.Options()
        options.acceptTimeout = 0.3
        let start = Date()
        #expect(throws: NetError.timeout(milliseconds: 300)) {
            _ = try VirtioNetDriver.listen(socket: socket, options: options)
        }
        let elapsed = Date().timeIntervalSince(start)
        #expect(elapsed >= 0.29 && elapsed < 3, "bounded by the accept timeout: \(elapsed) s")
        #expect(!FileManager.default.fileExists(atPath: socket))
        #expect(throws: UnixChannel.Error.self) {
            _ = try UnixChannel.connect(path: socket, until: .after(seconds: 0.1))
        }
    }

    @Test func backEndThatConnectsAndClosesAtOnceIsADisconnect() throws {
        let (dir, socket) = try Self.socketPath()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = VirtioNetDriver.Options()
        options.acceptTimeout = 10
        options.controlTimeout = 2
        let listening = Listening(socket: socket, options: options)
        do {
            let peer = try #require(Self.connectWhenListening(socket))
            _ = peer  // closed at the end of this scope, before the driver's first message is read
        }
        let result = try #require(listening.wait())
        guard case .failure(.disconnected) = result else {
            Issue.record("expected .disconnected, got \(result)")
            return
        }
        #expect(listening.seconds < 2, "no wait for a peer that is gone: \(listening.seconds) s")
        #expect(!FileManager.default.fileExists(atPath: socket))
    }

    @Test func backEndThatConnectsAndNeverAnswersTimesOutAndIsHungUpOn() throws {
        let (dir, socket) = try Self.socketPath()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = VirtioNetDriver.Options()
        options.acceptTimeout = 10
        options.controlTimeout = 0.5
        let listening = Listening(socket: socket, options: options)
        let peer = try #require(Self.connectWhenListening(socket))
        let result = try #require(listening.wait())
        guard case .failure(.timeout(milliseconds: 500)) = result else {
            Issue.record("expected .timeout(500 ms), got \(result)")
            return
        }
        #expect(listening.seconds < 3, "bounded by the control timeout: \(listening.seconds) s")
        // The driver's end is closed: after what it sent (SET_OWNER, GET_FEATURES), EOF.
        var buffer = [UInt8](repeating: 0, count: 4096)
        var sawEOF = false
        let deadline = Deadline.after(seconds: 5)
        while !deadline.hasPassed {
            let n = recv(peer.fileDescriptor, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if n == 0 {
                sawEOF = true
                break
            }
            if n < 0 && errno != EAGAIN && errno != EINTR { break }
            if n < 0 { usleep(10_000) }
        }
        #expect(sawEOF, "the accepted descriptor was closed")
    }
}
