import Foundation
import RingTestSupport
import Testing

/// The real Linux 6.1 `virtiofs` driver in a QEMU TCG guest against `ringfence serve-fs`:
/// create, write, read back, append, rename, readdir, stat, fsync, unlink, mkdir/rmdir,
/// symlink and a 16 MiB file; every result compared with the host directory afterwards.
@Suite(
    .serialized, .enabled(if: Interop.qemuAvailable, "qemu-system-x86_64 is not installed: Linux guest tests skipped"))
struct LinuxGuestFSTests {
    static let big = 16 << 20
    static let bigLine = "RINGFENCE-FS-0123456789\n"

    static let script = """
        mkdir -p /mnt
        mount -t virtiofs rfs /mnt || exit 30
        echo "mounted"
        [ "$(cat /mnt/host.txt)" = from-the-host ] || exit 31
        echo hello > /mnt/new.txt
        [ "$(cat /mnt/new.txt)" = hello ] || exit 32
        echo world >> /mnt/new.txt
        [ "$(wc -l < /mnt/new.txt)" = 2 ] || exit 33
        mv /mnt/new.txt /mnt/renamed.txt
        [ -e /mnt/new.txt ] && exit 34
        echo "listing=$(ls /mnt | tr '\\n' ' ')"
        echo "stat=$(stat -c '%s %a %F' /mnt/renamed.txt)"
        mkdir /mnt/d || exit 35
        mkdir /mnt/d/e || exit 36
        rmdir /mnt/d/e || exit 37
        echo gone > /mnt/d/unlinkme
        rm /mnt/d/unlinkme || exit 38
        [ -e /mnt/d/unlinkme ] && exit 39
        yes RINGFENCE-FS-0123456789 | head -c 16777216 > /tmp/big
        dd if=/tmp/big of=/mnt/d/big bs=1M conv=fsync 2>/dev/null || exit 40
        echo 3 > /proc/sys/vm/drop_caches
        cmp /tmp/big /mnt/d/big || exit 41
        echo "big ok"
        ln -s renamed.txt /mnt/link || exit 42
        [ "$(readlink /mnt/link)" = renamed.txt ] || exit 43
        [ "$(cat /mnt/link | head -n 1)" = hello ] || exit 44
        echo "$(stat -c %s /mnt/host.txt)" > /mnt/d/host-size
        umount /mnt || exit 45
        echo "fs ok"
        """

    @Test func linuxVirtiofsAgainstServeFS() throws {
        guard let binary = Interop.ringfenceBinary else {
            Issue.record("ringfence binary not built (swift build first)")
            return
        }
        #expect(try Interop.buildGuestImage(), "guest image builds")
        let work = "/tmp/rf-interop-fs-\(getpid())"
        let shared = "\(work)/shared"
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        try Data("from-the-host\n".utf8).write(to: URL(fileURLWithPath: "\(shared)/host.txt"))
        let socket = "\(work)/fs.sock"

        let server = Process()
        server.executableURL = URL(fileURLWithPath: binary)
        server.arguments = ["serve-fs", "--socket", socket, "--dir", shared, "--tag", "rfs", "--log-level", "debug"]
        let log = "\(work)/serve.log"
        #expect(FileManager.default.createFile(atPath: log, contents: nil))
        let logHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        server.standardOutput = logHandle
        server.standardError = logHandle
        try server.run()
        defer { if server.isRunning { server.terminate() } }
        ListeningSocket.wait(socket, seconds: 10)
        #expect(FileManager.default.fileExists(atPath: socket), "serve-fs listens")

        let scriptPath = "\(work)/fs.sh"
        let console = "\(work)/fs.console"
        try Self.script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let r = try Interop.run([
            "/bin/bash", "\(Interop.repoRoot)/scripts/guest/run-guest.sh", "--script", scriptPath,
            "--modules", "virtio_pci,fuse,virtiofs", "--timeout", "180", "--console", console, "--quiet",
            "--qemu-arg", "-chardev", "--qemu-arg", "socket,id=fs0,path=\(socket)",
            // QEMU 7.2 under TCG needs vectors=0 for vhost-user-fs-pci.
            "--qemu-arg", "-device", "--qemu-arg", "vhost-user-fs-pci,chardev=fs0,tag=rfs,vectors=0",
        ])
        let text = (try? String(contentsOfFile: console, encoding: .utf8)) ?? r.output
        #expect(r.status == 0, "guest: \(text.suffix(2000))")
        #expect(text.contains("listing=host.txt renamed.txt "), "readdir as the host has it")
        #expect(text.contains("stat=12 644 regular file"), "stat as the host has it")
        #expect(text.contains("fs ok"))

        server.terminate()
        server.waitUntilExit()
        try? logHandle.close()
        let serverLog = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(server.terminationStatus == 0, "serve-fs exit: \(serverLog.suffix(2000))")
        #expect(!serverLog.contains("rejected"), "no request rejected: \(serverLog.suffix(2000))")
        #expect(!serverLog.contains("failed"), "no queue failed: \(serverLog.suffix(2000))")

        // The host directory after the guest is gone.
        let fm = FileManager.default
        #expect(try fm.contentsOfDirectory(atPath: shared).sorted() == ["d", "host.txt", "link", "renamed.txt"])
        #expect(fm.contents(atPath: "\(shared)/renamed.txt") == Data("hello\nworld\n".utf8))
        #expect(try fm.destinationOfSymbolicLink(atPath: "\(shared)/link") == "renamed.txt")
        #expect(try fm.contentsOfDirectory(atPath: "\(shared)/d").sorted() == ["big", "host-size"])
        #expect(fm.contents(atPath: "\(shared)/d/host-size") == Data("14\n".utf8))
        let big = fm.contents(atPath: "\(shared)/d/big") ?? Data()
        let expected = Data(
            String(repeating: Self.bigLine, count: Self.big / Self.bigLine.count + 1).utf8.prefix(Self.big))
        let same = big == expected
        #expect(same, "16 MiB file as the guest wrote it (\(big.count) bytes)")
        #expect(fm.contents(atPath: "\(shared)/host.txt") == Data("from-the-host\n".utf8))
    }
}
