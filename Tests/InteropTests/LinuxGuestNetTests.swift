import Foundation
import RingTestSupport
import Testing

/// The real Linux 6.1 `virtio_net` driver in two QEMU TCG guests, both on one
/// `ringfence serve-net --switch`: each pings the other's IPv6 link-local address (busybox
/// ping6). Traffic stays between the two guests and this machine's serve-net.
@Suite(
    .serialized, .enabled(if: Interop.qemuAvailable, "qemu-system-x86_64 is not installed: Linux guest tests skipped"))
struct LinuxGuestNetTests {
    static let modules =
        "virtio_ring,virtio,virtio_pci_legacy_dev,virtio_pci_modern_dev,virtio_pci,failover,net_failover,virtio_net"

    /// Brings eth0 up, waits for DAD, pings the peer, then stays up a while so the peer's
    /// ping (which may start later) gets its answers too.
    static func script(peer: String) -> String {
        """
        ip link set eth0 up || exit 10
        i=0; while ! ip -6 addr show dev eth0 | grep -q fe80 || ip -6 addr show dev eth0 | grep -q tentative; do
          sleep 1; i=$((i+1)); [ $i -lt 40 ] || exit 11
        done
        echo "features=$(cat /sys/class/net/eth0/device/features)"
        ping6 -c 5 -w 60 -I eth0 \(peer) || exit 12
        echo "ping6 ok"
        sleep 15
        echo "rx_packets=$(cat /sys/class/net/eth0/statistics/rx_packets) rx_errors=$(cat /sys/class/net/eth0/statistics/rx_errors)"
        """
    }

    /// Boots one guest on `socket` with MAC 52:54:00:00:00:`last` (in the background).
    static func boot(name: String, last: String, socket: String, peer: String, packed: Bool, work: String) throws
        -> Process
    {
        let scriptPath = "\(work)/\(name).sh"
        try script(peer: peer).write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [
            "\(Interop.repoRoot)/scripts/guest/run-guest.sh", "--script", scriptPath, "--modules", modules,
            "--timeout", "150", "--console", "\(work)/\(name).console", "--quiet",
            "--qemu-arg", "-chardev", "--qemu-arg", "socket,id=c0,path=\(socket)",
            "--qemu-arg", "-netdev", "--qemu-arg", "vhost-user,id=n0,chardev=c0",
            // vectors=0: QEMU 7.2 under TCG crashes in vhost_net_start without it.
            "--qemu-arg", "-device",
            "--qemu-arg", "virtio-net-pci,netdev=n0,vectors=0,mac=52:54:00:00:00:\(last)\(packed ? ",packed=on" : "")",
        ]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return p
    }

    @Test(arguments: [false, true])
    func twoLinuxGuestsPingEachOtherThroughTheSwitch(packed: Bool) throws {
        guard let binary = Interop.ringfenceBinary else {
            Issue.record("ringfence binary not built (swift build first)")
            return
        }
        #expect(try Interop.buildGuestImage(), "guest image builds")
        let work = "/tmp/rf-interop-net-\(getpid())-\(packed)"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let a = "\(work)/a.sock"
        let b = "\(work)/b.sock"
        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments = ["serve-net", "--socket", a, "--socket", b, "--switch", "--log-level", "debug"]
        let log = "\(work)/serve.log"
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let logHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        server.standardOutput = logHandle
        server.standardError = logHandle
        try server.run()
        defer { if server.isRunning { server.terminate() } }
        let ready = Date().addingTimeInterval(10)
        while !(FileManager.default.fileExists(atPath: a) && FileManager.default.fileExists(atPath: b))
            && Date() < ready
        {
            usleep(20_000)
        }

        let guestA = try Self.boot(
            name: "a", last: "0a", socket: a, peer: "fe80::5054:ff:fe00:b", packed: packed, work: work)
        let guestB = try Self.boot(
            name: "b", last: "0b", socket: b, peer: "fe80::5054:ff:fe00:a", packed: packed, work: work)
        guestA.waitUntilExit()
        guestB.waitUntilExit()
        let consoleA = (try? String(contentsOfFile: "\(work)/a.console", encoding: .utf8)) ?? ""
        let consoleB = (try? String(contentsOfFile: "\(work)/b.console", encoding: .utf8)) ?? ""
        #expect(guestA.terminationStatus == 0, "guest a: \(consoleA.suffix(1500))")
        #expect(guestB.terminationStatus == 0, "guest b: \(consoleB.suffix(1500))")
        #expect(consoleA.contains("5 packets received") && consoleB.contains("5 packets received"))

        server.terminate()
        server.waitUntilExit()
        try? logHandle.close()
        let serverLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(server.terminationStatus == 0, "serve-net exit: \(serverLog.suffix(2000))")
        #expect(serverLog.contains(packed ? "(packed ring)" : "(split ring)"), "\(serverLog.suffix(2000))")
        // A real driver's frames are all legitimate: none may be rejected.
        #expect(serverLog.contains(" 0 rejected"), "\(serverLog.suffix(1000))")
        #expect(!serverLog.contains("failed"), "no queue failed: \(serverLog.suffix(2000))")
    }

    /// The guest reaches a TAP: serve-net --switch --tap, the TAP moved into a network
    /// namespace the test creates, the guest pings the namespace kernel's link-local address.
    @Test(
        .enabled(
            if: getuid() == 0 && FileManager.default.fileExists(atPath: "/dev/net/tun")
                && FileManager.default.isExecutableFile(atPath: NetTapTests.ip),
            "needs root, /dev/net/tun and ip(8)"))
    func linuxGuestReachesATapInANamespace() throws {
        guard let binary = Interop.ringfenceBinary else {
            Issue.record("ringfence binary not built (swift build first)")
            return
        }
        #expect(try Interop.buildGuestImage(), "guest image builds")
        let tag = "\(getpid() % 100_000)"
        let namespace = "rfgn\(tag)"
        let tap = "rfg\(tag)"
        let work = "/tmp/rf-interop-nettap-\(tag)"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        try #require(try Interop.run([NetTapTests.ip, "netns", "add", namespace]).status == 0)
        defer { _ = try? Interop.run([NetTapTests.ip, "netns", "del", namespace]) }
        let socket = "\(work)/a.sock"
        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments = ["serve-net", "--socket", socket, "--switch", "--tap", tap]
        let log = "\(work)/serve.log"
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let logHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        server.standardOutput = logHandle
        server.standardError = logHandle
        try server.run()
        defer { if server.isRunning { server.terminate() } }
        ListeningSocket.wait(socket, seconds: 10)
        #expect(try Interop.run([NetTapTests.ip, "link", "set", tap, "netns", namespace]).status == 0)
        #expect(
            try Interop.run([
                NetTapTests.ip, "netns", "exec", namespace, NetTapTests.ip, "link", "set", tap, "address",
                "02:00:00:00:00:aa", "up",
            ]).status == 0)

        let guest = try Self.boot(
            name: "g", last: "0c", socket: socket, peer: "fe80::ff:fe00:aa", packed: false, work: work)
        guest.waitUntilExit()
        let console = (try? String(contentsOfFile: "\(work)/g.console", encoding: .utf8)) ?? ""
        #expect(guest.terminationStatus == 0, "guest: \(console.suffix(1500))")
        #expect(console.contains("5 packets received"), "the namespace's kernel answered every ping")
        server.terminate()
        server.waitUntilExit()
        try? logHandle.close()
        let serverLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(serverLog.contains("TAP \(tap) is a port of the switch"), "\(serverLog.suffix(1000))")
        #expect(serverLog.contains(" 0 rejected"), "\(serverLog.suffix(1000))")
    }
}
