import Foundation
import Testing

/// `ringfence audit --target linux-guest --kernel ...`: a second kernel, given on the command
/// line, audited like the default one (Debian's cloud kernel: another config, same 6.1).
extension AuditCommandTests {
    /// Debian's `linux-image-6.1*-cloud-amd64`: `apt-get download`ed (never installed) and
    /// extracted once into .build-guest-kernels/debian-cloud; nil when apt cannot fetch it.
    static func debianCloudKernel() throws -> (deb: String, root: String, vmlinuz: String)? {
        let cache = Interop.repoRoot + "/.build-guest-kernels/debian-cloud"
        try FileManager.default.createDirectory(atPath: cache, withIntermediateDirectories: true)
        let script = """
            set -e
            cd "$1"
            pkg="$(apt-cache depends linux-image-cloud-amd64 \\
                | sed -n 's/^ *Depends: *\\(linux-image-6\\.1[^ ]*-cloud-amd64\\)$/\\1/p' | head -n1)"
            [ -n "$pkg" ]
            ls "$pkg"_*.deb >/dev/null 2>&1 || apt-get download "$pkg" >&2
            deb="$(ls "$pkg"_*.deb | head -n1)"
            [ -d root/boot ] || dpkg -x "$deb" root
            echo "$PWD/$deb"
            ls "$PWD"/root/boot/vmlinuz-* | head -n1
            """
        let r = try Interop.run(["/bin/bash", "-c", script, "fetch", cache])
        let lines = r.output.split(whereSeparator: \.isNewline).map(String.init).filter { $0.hasPrefix("/") }
        guard r.status == 0, lines.count >= 2 else {
            print("Debian cloud kernel not available: \(r.output)")
            return nil
        }
        return (lines[lines.count - 2], cache + "/root", lines[lines.count - 1])
    }

    static func kernelObject(_ path: String) throws -> [String: Any] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        let object = try JSONSerialization.jsonObject(with: data) as? [String: Any]
        return try #require(object?["kernel"] as? [String: Any])
    }

    /// The cloud kernel given as a bzImage plus its .deb: the image is built around it, the
    /// guest boots it (uname -r), and the report names it with its config flags.
    @Test(.enabled(if: Interop.qemuAvailable, "qemu-system-x86_64 is not installed: Linux guest audit skipped"))
    func linuxGuestAuditOfASecondKernelFromTheCommandLine() throws {
        let cloud = try #require(try Self.debianCloudKernel(), "apt-get download of the cloud kernel failed")
        let json = NSTemporaryDirectory() + "rf-audit-cloud-\(getpid()).json"
        let images = NSTemporaryDirectory() + "rf-audit-cloud-images-\(getpid())"
        defer {
            try? FileManager.default.removeItem(atPath: json)
            try? FileManager.default.removeItem(atPath: images)
        }
        let r = try Interop.run([
            try Self.binary(), "audit", "--target", "linux-guest", "--deadline", "30", "--kernel", cloud.vmlinuz,
            "--modules-deb", cloud.deb, "--image-dir", images, "--only", "status-garbage,config-blk-size-0",
            "--json", json,
        ])
        #expect(r.status == 0, "\(r.output)")
        let release = URL(fileURLWithPath: cloud.vmlinuz).lastPathComponent.replacingOccurrences(
            of: "vmlinuz-", with: "")
        #expect(release.hasSuffix("-cloud-amd64"))
        let kernel = try Self.kernelObject(json)
        #expect(kernel["release"] as? String == release)
        #expect(kernel["booted"] as? String == release, "the guest ran the kernel given on the command line")
        let config = try #require(kernel["config"] as? [String: String])
        #expect(config["CONFIG_VIRTIO_BLK"] == "m")
        #expect(config["CONFIG_SWIOTLB"] == "y")
        #expect(r.output.contains("Kernel: `\(release)`, from linux-image-\(release)"), "\(r.output)")
        #expect(r.output.contains("Config: VIRTIO_BLK=m, VIRTIO_PCI=m,"))
        #expect(r.output.contains("attacks against Linux \(release) virtio_blk"))
        let outcome = Dictionary(
            uniqueKeysWithValues: try Self.records(json).map {
                ($0["attack"] as? String ?? "", $0["outcome"] as? String ?? "")
            })
        #expect(outcome["status-garbage"] == "I/O error", "\(r.output)")
        #expect(outcome["config-blk-size-0"] == "contained-with-error", "\(r.output)")
    }

    /// Modules of another kernel are refused before any guest boots (their vermagic names
    /// another release): a module that cannot load would read as a device the kernel refused.
    @Test func auditRefusesModulesBuiltForAnotherKernel() throws {
        let cloud = try #require(try Self.debianCloudKernel(), "apt-get download of the cloud kernel failed")
        #expect(try Interop.buildGuestImage())
        let images = NSTemporaryDirectory() + "rf-audit-mismatch-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: images) }
        let r = try Interop.run([
            try Self.binary(), "audit", "--target", "linux-guest", "--kernel",
            Interop.repoRoot + "/.build-guest/vmlinuz",
            "--modules", cloud.root, "--image-dir", images, "--only", "status-garbage",
        ])
        #expect(r.status != 0)
        #expect(r.output.contains("is built for 6.1."), "\(r.output)")
        #expect(r.output.contains("-cloud-amd64, the kernel is 6.1."), "\(r.output)")
        #expect(!r.output.contains("| 1 |"), "no attack ran")
    }

    @Test func auditRefusesAFileThatIsNotAKernel() throws {
        let images = NSTemporaryDirectory() + "rf-audit-notkernel-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: images) }
        let notKernel = NSTemporaryDirectory() + "rf-not-a-kernel-\(getpid())"
        _ = FileManager.default.createFile(atPath: notKernel, contents: Data(repeating: 0x41, count: 4096))
        defer { try? FileManager.default.removeItem(atPath: notKernel) }
        let r = try Interop.run([
            try Self.binary(), "audit", "--target", "linux-guest", "--kernel", notKernel, "--image-dir", images,
        ])
        #expect(r.status != 0)
        #expect(r.output.contains("is not a bzImage (no HdrS header)"), "\(r.output)")
        let misuse = try Interop.run([try Self.binary(), "audit", "--kernel", notKernel])
        #expect(misuse.status != 0)
        #expect(misuse.output.contains("need --target linux-guest"), "\(misuse.output)")
        for device in ["fs", "net"] {
            let other = try Interop.run([
                try Self.binary(), "audit", "--target", "linux-guest", "--device", device, "--kernel", notKernel,
            ])
            #expect(other.status == 2, "\(other.output)")
            #expect(other.output.contains("audit virtio_blk (--device blk) only"), "\(other.output)")
        }
    }
}
