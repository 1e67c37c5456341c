import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioNet

/// serve-net's TAP port: a TAP in a network namespace the test creates (so nothing leaves
/// it), frames crossing both ways between our driver and the namespace's kernel.
@Suite(
    .serialized,
    .enabled(
        if: getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/net/tun")
            && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
            || FileManager.default.isExecutableFile(
                atPath: "/sbin/ip"),
        "needs root, /dev/net/tun and ip(8)"))
struct NetTapTests {
    static let ip = FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") ? "/usr/sbin/ip" : "/sbin/ip"
    static let busybox = "/bin/busybox"

    @discardableResult
    static func sh(_ arguments: [String]) throws -> (Int32, String) {
        let r = try Interop.run([ip] + arguments)
        return (r.status, r.output)
    }

    @Test func framesCrossBetweenOurDriverAndAKernelInANamespace() throws {
        let tag = "\(getpid() % 100_000)"
        let namespace = "rfnet\(tag)"
        let tapName = "rft\(tag)"
        try #require(try Self.sh(["netns", "add", namespace]).0 == 0)
        defer { _ = try? Self.sh(["netns", "del", namespace]) }
        let dir = NSTemporaryDirectory() + "rf-tap-\(tag)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }

        let served = try NetInteropTests.Served(mode: .switch, ports: 1, directory: dir)
        defer { served.stop() }
        let tap = try NetTap(name: tapName, fabric: served.fabric)
        defer { tap.stop() }
        #expect(try Self.sh(["link", "set", tapName, "netns", namespace]).0 == 0)
        let inside = ["netns", "exec", namespace, Self.ip]
        #expect(try Self.sh(inside + ["link", "set", tapName, "address", "02:00:00:00:00:aa", "up"]).0 == 0)

        var options = VirtioNetDriver.Options()
        options.queueSize = 64
        let net = try VirtioNetDriver.connect(socket: served.sockets[0], options: options)
        defer { net.close() }

        // Driver -> kernel: 20 broadcast frames show in the TAP's receive counter.
        func tapCounter(_ name: String) throws -> Int {
            let r = try Interop.run(
                [Self.ip] + ["netns", "exec", namespace, "cat", "/sys/class/net/\(tapName)/statistics/\(name)"])
            return Int(r.output.trimmingCharacters(in: .whitespacesAndNewlines)) ?? -1
        }
        let before = try tapCounter("rx_packets")
        for seq in 0..<20 {
            let f = NetTraffic.frame(
                dst: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff], src: net.info.mac, size: 100, sequence: UInt64(seq))
            #expect(try net.pair(0).send(f))
        }
        #expect(NetInteropTests.waitUntil(seconds: 5) { ((try? tapCounter("rx_packets")) ?? 0) >= before + 20 })

        // Kernel -> driver: the namespace pings all-nodes on the TAP; the echo requests
        // (and the kernel's own IPv6 chatter) reach our driver from the TAP's MAC.
        // busybox ping6 (Debian busybox-static): iputils' ping is not installed here.
        let ping = try Interop.run([
            Self.ip, "netns", "exec", namespace, Self.busybox, "ping6", "-c", "3", "-I", tapName, "ff02::1",
        ])
        _ = ping
        let frames = try receiveFrames(net, seconds: 5) {
            $0.count >= 14 && Array($0[6..<12]) == [2, 0, 0, 0, 0, 0xaa]
        }
        #expect(frames > 0, "frames from the TAP's kernel reached our driver")
        #expect(served.fabric.statistics.framesRejected == 0)
    }

    func receiveFrames(_ net: VirtioNetDriver, seconds: Double, matching: ([UInt8]) -> Bool) throws -> Int {
        let batch = NetFrameBatch(capacity: 32, frameCapacity: net.info.maximumFrame)
        var n = 0
        let deadline = Deadline.after(seconds: seconds)
        while n == 0 && !deadline.hasPassed {
            batch.removeAll()
            let got = try net.pair(0).receive(into: batch)
            for i in 0..<got where matching(batch.bytes(i)) { n += 1 }
            if got == 0 { _ = net.pair(0).waitForReceive(until: min(deadline, .after(seconds: 0.1))) }
        }
        return n
    }
}
