import Foundation
import RingTestSupport
import Testing

/// Helpers to run the real peers: the `ringfence` binary and a QEMU TCG Linux guest
/// (scripts/guest). Nothing here is a mock.
enum Interop {
    static let repoRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()

    static let qemu = "/usr/bin/qemu-system-x86_64"
    static var qemuAvailable: Bool { FileManager.default.isExecutableFile(atPath: qemu) }

    static var ringfenceBinary: String? {
        for configuration in ["debug", "release"] {
            let path = "\(repoRoot)/.build/\(configuration)/ringfence"
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        return nil
    }

    /// Runs a command to completion (with its own timeout inside), returning status and output.
    @discardableResult
    static func run(_ arguments: [String], environment: [String: String] = [:]) throws -> (
        status: Int32, output: String
    ) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: arguments[0])
        p.arguments = Array(arguments.dropFirst())
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// Builds (or finds cached) the guest kernel + initramfs.
    static func buildGuestImage() throws -> Bool {
        let r = try run(["/bin/bash", "\(repoRoot)/scripts/guest/build-image.sh"])
        if r.status != 0 { print(r.output) }
        return r.status == 0
    }

    /// Boots the guest with `script` against the vhost-user-blk socket, with one vCPU per
    /// queue whatever the host has (Linux virtio_blk uses at most one queue per vCPU, and
    /// run-guest.sh would cap the vCPUs at the host's CPUs: a test pinned to one CPU saw
    /// `queues=1`).
    static func bootGuest(
        script: String, socket: String, queues: Int, workDir: String, name: String, packed: Bool = false
    ) throws -> (status: Int32, console: String, seconds: Double) {
        let scriptPath = "\(workDir)/\(name).sh"
        let console = "\(workDir)/\(name).console"
        try script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let start = Date()
        let r = try run([
            "/bin/bash", "\(repoRoot)/scripts/guest/run-guest.sh", "--script", scriptPath,
            "--blk-socket", socket, "--num-queues", "\(queues)", "--smp", "\(queues)", "--timeout", "120",
            "--console", console, "--quiet", "--packed", packed ? "on" : "off",
        ])
        let text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? r.output
        return (r.status, text, Date().timeIntervalSince(start))
    }
}

/// The real Linux 6.1 `virtio_blk` driver in a QEMU TCG guest against `ringfence serve-blk`.
/// Two boots against one running server (the second is the reconnect test).
@Suite(
    .serialized, .enabled(if: Interop.qemuAvailable, "qemu-system-x86_64 is not installed: Linux guest tests skipped"))
struct LinuxGuestBlockTests {
    static let mib = 1 << 20
    static let patternOffset = 48 << 20
    static let discardOffset = 40 << 20
    static let discardLength = 4 << 20

    static let firstBoot = """
        waitdev /dev/vda 10 || exit 10
        sig=$(dd if=/dev/vda bs=13 count=1 2>/dev/null)
        [ "$sig" = "RINGFENCE-SIG" ] || { echo "bad signature: $sig"; exit 11; }
        echo "signature ok"
        q=$(ls /sys/block/vda/mq | wc -l); echo "queues=$q"
        [ "$q" = 2 ] || exit 12
        echo "discard_max_bytes=$(cat /sys/block/vda/queue/discard_max_bytes)"
        yes RINGFENCE-PATTERN-0123456789 | head -c 1048576 > /tmp/pat
        dd if=/tmp/pat of=/dev/vda bs=65536 seek=768 conv=fsync 2>/dev/null || exit 13
        echo 3 > /proc/sys/vm/drop_caches
        dd if=/dev/vda bs=65536 skip=768 count=16 2>/dev/null | cmp - /tmp/pat || exit 14
        echo "pattern ok"
        blkdiscard -o 41943040 -l 4194304 /dev/vda || exit 15
        echo "discard ok"
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/vda of=/dev/null bs=1M count=32 iflag=direct 2>/dev/null || dd if=/dev/vda of=/dev/null bs=1M count=32 2>/dev/null
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "read32MiB start=$t0 end=$t1"
        mkfs.ext2 /dev/vda 32768 >/tmp/mkfs.log 2>&1 || { cat /tmp/mkfs.log; exit 16; }
        mkdir -p /mnt
        mount -t ext2 /dev/vda /mnt || exit 17
        yes hello-from-linux | head -c 200000 > /mnt/hello.txt
        sync
        umount /mnt || exit 18
        echo 3 > /proc/sys/vm/drop_caches
        mount -t ext2 /dev/vda /mnt || exit 19
        md5sum /mnt/hello.txt
        [ "$(md5sum < /mnt/hello.txt)" = "$(yes hello-from-linux | head -c 200000 | md5sum)" ] || exit 20
        umount /mnt
        echo "filesystem ok"
        """

    static let secondBoot = """
        waitdev /dev/vda 10 || exit 10
        echo "queues=$(ls /sys/block/vda/mq | wc -l)"
        mkdir -p /mnt
        mount -t ext2 /dev/vda /mnt || exit 21
        [ "$(md5sum < /mnt/hello.txt)" = "$(yes hello-from-linux | head -c 200000 | md5sum)" ] || exit 22
        echo written-on-second-boot > /mnt/second.txt
        sync
        umount /mnt || exit 23
        yes RINGFENCE-PATTERN-0123456789 | head -c 1048576 > /tmp/pat
        dd if=/dev/vda bs=65536 skip=768 count=16 2>/dev/null | cmp - /tmp/pat || exit 24
        echo "reconnect ok"
        """

    @Test func linuxGuestReadsWritesFormatsAndReconnects() throws {
        guard let binary = Interop.ringfenceBinary else {
            Issue.record("ringfence binary not built (swift build first)")
            return
        }
        #expect(try Interop.buildGuestImage(), "guest image builds")
        let work = "/tmp/rf-interop-\(getpid())"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let image = "\(work)/disk.img"
        let socket = "\(work)/blk.sock"

        // 64 MiB sparse image: a signature in sector 0, 0xFF where the guest will discard.
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
        try handle.truncate(atOffset: UInt64(64 * Self.mib))
        try handle.seek(toOffset: 0)
        handle.write(Data("RINGFENCE-SIG".utf8))
        try handle.seek(toOffset: UInt64(Self.discardOffset))
        handle.write(Data(repeating: 0xFF, count: Self.discardLength))
        try handle.close()

        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments = ["serve-blk", "--socket", socket, "--image", image, "--queues", "2", "--log-level", "debug"]
        let log = "\(work)/serve.log"
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let logHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        server.standardOutput = logHandle
        server.standardError = logHandle
        try server.run()
        defer { if server.isRunning { server.terminate() } }
        ListeningSocket.wait(socket, seconds: 10)
        #expect(FileManager.default.fileExists(atPath: socket), "serve-blk listens")

        let first = try Interop.bootGuest(
            script: Self.firstBoot, socket: socket, queues: 2, workDir: work, name: "boot1")
        print("[interop] boot 1 (2 queues): rc=\(first.status) in \(String(format: "%.1f", first.seconds)) s")
        print(
            first.console.split(separator: "\n").filter { $0.contains("=") || $0.contains("ok") }.joined(
                separator: "\n"))
        #expect(first.status == 0, "first boot: \(first.console.suffix(1500))")

        let second = try Interop.bootGuest(
            script: Self.secondBoot, socket: socket, queues: 1, workDir: work, name: "boot2")
        print(
            "[interop] boot 2 (reconnect, 1 queue): rc=\(second.status) in \(String(format: "%.1f", second.seconds)) s")
        #expect(second.status == 0, "second boot: \(second.console.suffix(1500))")

        // SIGTERM: clean exit, socket removed.
        server.terminate()
        server.waitUntilExit()
        try? logHandle.close()
        let serverLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(server.terminationStatus == 0, "serve-blk exit: \(serverLog.suffix(2000))")
        #expect(!FileManager.default.fileExists(atPath: socket), "socket removed on SIGTERM")
        #expect(serverLog.contains("front-end #2 connected"), "second front-end served")
        #expect(!serverLog.contains("failed"), "no queue failed: \(serverLog.suffix(2000))")
        // A real driver's chains are all legitimate: none may be rejected (this caught
        // indirect tables sized by seg_max rather than by the ring).
        #expect(!serverLog.contains("rejected"), "no request rejected: \(serverLog.suffix(2000))")

        // Host-side checks on the image after shutdown.
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        let pattern = Data(
            String(repeating: "RINGFENCE-PATTERN-0123456789\n", count: Self.mib / 29 + 1).utf8.prefix(Self.mib))
        // Compared into Bools first: a failed #expect on 1 MiB values would make the test
        // library compute a diff for minutes.
        let patternOnHost = data[Self.patternOffset..<Self.patternOffset + Self.mib] == pattern
        #expect(patternOnHost, "guest pattern on host")
        let discarded = data[Self.discardOffset..<Self.discardOffset + Self.discardLength].allSatisfy { $0 == 0 }
        #expect(discarded, "discarded range reads zeros")
        let fsck = try Interop.run(["/usr/sbin/e2fsck", "-fn", image])
        #expect(fsck.status == 0, "e2fsck: \(fsck.output)")
        let cat = try Interop.run(["/usr/sbin/debugfs", "-R", "cat /second.txt", image])
        #expect(cat.output.contains("written-on-second-boot"), "debugfs: \(cat.output)")
    }

    /// Issue 7: the same I/O script over packed virtqueues (`packed=on`); the device's log
    /// must show VIRTIO_F_RING_PACKED acked, the guest's feature bits must show it too.
    @Test func linuxGuestOverPackedRing() throws {
        guard let binary = Interop.ringfenceBinary else {
            Issue.record("ringfence binary not built (swift build first)")
            return
        }
        #expect(try Interop.buildGuestImage(), "guest image builds")
        let work = "/tmp/rf-interop-packed-\(getpid())"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let image = "\(work)/disk.img"
        let socket = "\(work)/blk.sock"
        #expect(FileManager.default.createFile(atPath: image, contents: nil))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
        try handle.truncate(atOffset: UInt64(64 * Self.mib))
        try handle.seek(toOffset: 0)
        handle.write(Data("RINGFENCE-SIG".utf8))
        try handle.close()

        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments = ["serve-blk", "--socket", socket, "--image", image, "--queues", "2", "--log-level", "debug"]
        let log = "\(work)/serve.log"
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let logHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        server.standardOutput = logHandle
        server.standardError = logHandle
        try server.run()
        defer { if server.isRunning { server.terminate() } }
        ListeningSocket.wait(socket, seconds: 10)
        #expect(FileManager.default.fileExists(atPath: socket), "serve-blk listens")

        let script = """
            waitdev /dev/vda 10 || exit 10
            p=$(cut -c35 /sys/block/vda/device/features); echo "packed=$p"
            [ "$p" = 1 ] || exit 30
            """ + "\n" + Self.firstBoot.split(separator: "\n").dropFirst().joined(separator: "\n")
        let boot = try Interop.bootGuest(
            script: script, socket: socket, queues: 2, workDir: work, name: "packed", packed: true)
        print("[interop] packed boot (2 queues): rc=\(boot.status) in \(String(format: "%.1f", boot.seconds)) s")
        print(
            boot.console.split(separator: "\n").filter { $0.contains("=") || $0.contains("ok") }.joined(separator: "\n")
        )
        #expect(boot.status == 0, "packed boot: \(boot.console.suffix(1500))")
        #expect(boot.console.contains("packed=1"), "the guest negotiated packed")

        server.terminate()
        server.waitUntilExit()
        try? logHandle.close()
        let serverLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(server.terminationStatus == 0, "serve-blk exit: \(serverLog.suffix(2000))")
        #expect(serverLog.contains("(packed ring)"), "device log shows packed negotiated: \(serverLog.suffix(2000))")
        // QEMU first acks a minimal set (no rings) at realize; the last ack is the guest's.
        let lastAck = serverLog.split(separator: "\n").last { $0.contains("acked features") } ?? ""
        #expect(lastAck.contains("(packed ring)"), "the guest driver's features: \(lastAck)")
        #expect(!serverLog.contains("failed"), "no queue failed: \(serverLog.suffix(2000))")
        #expect(!serverLog.contains("rejected"), "no request rejected: \(serverLog.suffix(2000))")
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        let pattern = Data(
            String(repeating: "RINGFENCE-PATTERN-0123456789\n", count: Self.mib / 29 + 1).utf8.prefix(Self.mib))
        let patternOnHost = data[Self.patternOffset..<Self.patternOffset + Self.mib] == pattern
        #expect(patternOnHost, "guest pattern on host")
        let fsck = try Interop.run(["/usr/sbin/e2fsck", "-fn", image])
        #expect(fsck.status == 0, "e2fsck: \(fsck.output)")
    }
}
