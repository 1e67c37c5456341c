/// Reads a Linux guest's console after an attack (`ringfence audit --target linux-guest`).
public enum GuestConsole {
    /// The script the guest runs against `/dev/vda`: reads, writes and a flush, each
    /// bounded (busybox `timeout`), a private canary in guest RAM, and markers to grep.
    public static func ioScript(canary: String) -> String {
        """
        echo 5 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
        echo "\(canary)" > /tmp/private-canary
        if ! waitdev /dev/vda 8; then echo "RF-NO-DEVICE"; exit 3; fi
        echo "RF-SIZE $(cat /sys/block/vda/size) $(cat /sys/block/vda/queue/logical_block_size)"
        echo "RF-SERIAL $(timeout 12 cat /sys/block/vda/serial 2>&1 | head -c 64)"
        head -c 65536 /dev/urandom > /tmp/pattern
        run() { timeout 12 "$@" 2>&1; r=$?; [ $r = 0 ] || echo "RF-FAIL rc=$r: $*"; return $r; }
        ok=0
        run dd if=/tmp/pattern of=/dev/vda bs=4096 seek=16 oflag=direct conv=fsync || ok=1
        run dd if=/dev/vda of=/tmp/back bs=4096 skip=16 count=16 iflag=direct || ok=1
        if [ $ok = 0 ]; then cmp -s /tmp/pattern /tmp/back && echo "RF-DATA-OK" || echo "RF-DATA-MISMATCH"; fi
        run dd if=/dev/vda of=/dev/null bs=65536 count=32 iflag=direct || ok=1
        run sync
        echo "RF-IO-END ok=$ok"
        """
    }

    /// Outcome and the console lines that show it.
    public static func classify(console: String, exitStatus: Int32, timedOut: Bool) -> (Outcome, String) {
        let lines = console.split(whereSeparator: \.isNewline).map(String.init)
        func first(_ needles: [String]) -> String? {
            lines.first { l in needles.contains { l.contains($0) } }
        }
        if let l = first(["Oops", "BUG:", "kernel BUG", "general protection fault", "Kernel panic", "UBSAN:", "KASAN:"])
        {
            return (.kernelOops, excerpt(lines, around: l))
        }
        if let l = first(["blocked for more than", "hung_task"]) { return (.hungTask, excerpt(lines, around: l)) }
        if let l = first(["RINGFENCE-GUEST-ERROR: loading module"]) {
            return (.notRun, "the image's modules did not load (a harness problem, not a finding): " + l)
        }
        if timedOut { return (.hung, "guest did not finish: " + notable(lines)) }
        guard lines.contains(where: { $0.contains("RINGFENCE-GUEST-START") }) else {
            return (
                .contained,
                "guest never started (front-end refused the device): " + lines.suffix(3).joined(separator: " ⏎ ")
            )
        }
        if let l = first(["RF-NO-DEVICE"]) {
            return (.contained, "no /dev/vda: the device was refused. " + (first(["virtio_blk", "virtio"]) ?? l))
        }
        if let l = first(["I/O error", "RF-FAIL", "critical", "Buffer I/O"]) {
            if lines.contains(where: { $0.contains("RF-FAIL") && $0.contains("rc=143") }) {
                return (.hung, "I/O did not finish within 12 s (killed by timeout): " + excerpt(lines, around: l))
            }
            return (.ioError, excerpt(lines, around: l))
        }
        if let l = first(["RF-DATA-MISMATCH"]) { return (.acceptedBadData, l) }
        if lines.contains(where: { $0.contains("RF-IO-END ok=0") }) {
            return (.clean, first(["RF-SIZE"]).map { "I/O script passed; \($0)" } ?? "I/O script passed")
        }
        return (.contained, "script ended early (exit \(exitStatus)): " + lines.suffix(3).joined(separator: " ⏎ "))
    }

    /// The release the guest's init printed (`RINGFENCE-GUEST-START kernel=...`).
    public static func bootedRelease(console: String) -> String? {
        guard let r = console.range(of: "RINGFENCE-GUEST-START kernel=") else { return nil }
        let release = console[r.upperBound...].prefix { !$0.isWhitespace }
        return release.isEmpty ? nil : String(release)
    }

    /// Kernel lines about the device (what the driver said before it stopped).
    static func notable(_ lines: [String]) -> String {
        let picked = lines.filter { l in
            ["virtio", "vda", "blk", "I/O error", "RF-"].contains { l.contains($0) } && !l.contains("RINGFENCE-GUEST")
        }
        let chosen = picked.isEmpty ? Array(lines.suffix(2)) : Array(picked.prefix(2))
        return chosen.map { String($0.drop(while: { $0 == " " })) }.joined(separator: " ⏎ ")
    }

    static func excerpt(_ lines: [String], around line: String) -> String {
        guard let i = lines.firstIndex(of: line) else { return line }
        return lines[i..<min(lines.count, i + 3)].map { $0.trimmingPrefix(while: { $0 == " " }) }
            .joined(separator: " ⏎ ")
    }
}

extension String {
    fileprivate func trimmingPrefix(while p: (Character) -> Bool) -> String { String(drop(while: p)) }
}
