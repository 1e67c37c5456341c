#if canImport(Glibc)
import Glibc
#endif
import BlockImage
import Foundation
import SharedMemory
import VhostUser
public import VirtioBlock
import Virtqueue

/// What our driver did against one attack, measured inside the process that ran it.
public struct ProbeResult: Sendable, Codable, Equatable {
    /// How our driver failed (or that it did not).
    public var signature: Signature
    /// The error line (or what was checked when nothing failed).
    public var evidence: String
    /// Seconds from the first request to the failure (or to the end of the script).
    public var seconds: Double
    /// The private canary showed up in shared memory (R7 broken).
    public var canaryFound: Bool
    /// A second device of the same process still read back what it wrote (R6).
    public var neighbourOK: Bool
    /// Bytes of shared memory searched for the canary.
    public var sharedBytesSearched: Int
}

/// Runs our `VirtioBlock` driver through a fixed I/O script against an attacked device,
/// with a healthy second device in the same process and a private canary.
public enum DriverProbe {
    /// Timeouts and length of the I/O script.
    public struct Settings: Sendable {
        /// The driver's per-request deadline, seconds.
        public var requestTimeout = 1.5
        /// The driver's control-plane deadline, seconds.
        public var controlTimeout = 1.0
        /// Rounds of the write/read/flush script.
        public var rounds = 4
        /// Whether our driver acks VIRTIO_F_RING_PACKED when offered (it does by default).
        public var packedRing = true
        /// The defaults the audit uses.
        public init() {}
    }

    /// Both devices in this process: the adversary (real back-end, hooks) and a healthy
    /// neighbour; returns once the script ends.
    public static func run(
        _ attack: Attack?, after: Int? = nil, settings: Settings = Settings(), directory: String
    ) -> ProbeResult {
        let fm = FileManager.default
        try? fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let imageSize = 8 << 20
        func image(_ name: String) -> VirtioBlockDevice? {
            let path = "\(directory)/\(name).img"
            guard fm.createFile(atPath: path, contents: nil), truncate(path, off_t(imageSize)) == 0,
                let img = try? DeviceImage(path: path)
            else { return nil }
            return VirtioBlockDevice(image: img, options: VirtioBlockDeviceOptions())
        }
        guard let attackedDisk = image("attacked"), let neighbourDisk = image("neighbour") else {
            return ProbeResult(
                signature: .otherError, evidence: "cannot create images in \(directory)", seconds: 0,
                canaryFound: false, neighbourOK: false, sharedBytesSearched: 0)
        }
        let adversary = AdversaryDevice(inner: attackedDisk, attack: attack, after: after)
        let server = AdversaryServer(device: adversary)
        let healthy = AdversaryServer(device: AdversaryDevice(inner: neighbourDisk, attack: nil))
        defer {
            server.stop()
            healthy.stop()
        }
        var options = VirtioBlockDriver.Options()
        options.requestTimeout = settings.requestTimeout
        options.controlTimeout = settings.controlTimeout
        options.packedRing = settings.packedRing
        do {
            try server.start(socketPath: "\(directory)/attacked.sock")
            try healthy.start(socketPath: "\(directory)/neighbour.sock")
        } catch {
            return ProbeResult(
                signature: .otherError, evidence: "listen: \(error)", seconds: 0, canaryFound: false,
                neighbourOK: false, sharedBytesSearched: 0)
        }
        let neighbour = try? VirtioBlockDriver.connect(socket: "\(directory)/neighbour.sock", options: options)
        defer { neighbour?.close() }

        // Private to this process: lives only in a heap buffer a read overwrites.
        var canary = [UInt8](repeating: 0, count: 32)
        for i in canary.indices { canary[i] = UInt8.random(in: 0...255) }
        canary[0] = 0xc4

        let start = monotonicNanoseconds()
        // Four requests a round: enough rounds that the attack starts after `after` good ones.
        let rounds = max(settings.rounds, adversary.after / 4 + 2)
        let packed = attack?.ring == .packed
        var result = script(
            socket: "\(directory)/attacked.sock", options: options, rounds: rounds, canary: canary, pipelined: packed)
        result.seconds = Double(monotonicNanoseconds() &- start) / 1e9
        let shared = adversary.snapshotSharedMemory()
        result.sharedBytesSearched = shared.count
        result.canaryFound = contains(shared, canary)
        result.neighbourOK = neighbourWorks(neighbour)
        let seen = adversary.observations
        if !seen.notes.isEmpty { result.evidence += " [device: " + seen.notes.joined(separator: "; ") + "]" }
        if seen.notificationsSent > 0 { result.evidence += " [device sent \(seen.notificationsSent) notifications]" }
        if seen.rewrittenDescriptors > 0 {
            result.evidence += " [device rewrote \(seen.rewrittenDescriptors) used descriptors after they were read]"
        }
        if packed && seen.negotiatedRing != .packed {
            // Nothing was attacked: report it as such, never as a pass.
            result.evidence =
                "the driver acked the \(seen.negotiatedRing?.rawValue ?? "no") ring, not VIRTIO_F_RING_PACKED; "
                + "served honestly (\(result.signature): \(result.evidence))"
            result.signature = .notApplicable
        }
        return result
    }

    /// Connect, then rounds of write / read (into a canary-filled buffer) / GET_ID / flush.
    /// `pipelined` (packed attacks) starts each round with two writes in flight together
    /// and a poll once both are done: a duplicated id or a used mark in a slot never made
    /// available is only visible to a driver that looks then (as on an interrupt).
    static func script(
        socket: String, options: VirtioBlockDriver.Options, rounds: Int, canary: [UInt8], pipelined: Bool = false
    ) -> ProbeResult {
        func failed(_ e: VirtioError) -> ProbeResult {
            ProbeResult(
                signature: signature(of: e), evidence: e.description, seconds: 0, canaryFound: false,
                neighbourOK: false, sharedBytesSearched: 0)
        }
        let disk: VirtioBlockDriver
        do { disk = try VirtioBlockDriver.connect(socket: socket, options: options) } catch { return failed(error) }
        defer { disk.close() }
        let count = 4096
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        defer { buffer.deallocate() }
        var wrong = 0
        var spurious: UInt64 = 0
        for round in 0..<rounds {
            let pattern = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ round &* 7 &+ 1) }
            for i in 0..<count { buffer[i] = canary[i % canary.count] }
            do throws(VirtioError) {
                let offset = UInt64(round) * UInt64(count)
                if pipelined { try writePair(disk, at: offset, pattern) }
                try disk.write(at: offset, bytes: pattern)
                try disk.read(at: offset, into: buffer)
                if !pattern.elementsEqual(buffer) { wrong += 1 }
                let id = try disk.identify()
                guard id.utf8.count <= BlockProtocol.idSize else {
                    throw VirtioError.invalidRequest("serial of \(id.utf8.count) bytes")
                }
                if disk.info.supportsFlush { try disk.flush() }
            } catch {
                return failed(error)
            }
        }
        for q in 0..<disk.queueCount { spurious &+= disk.queue(q).statistics.spuriousNotifications }
        let detail =
            "\(rounds) rounds of \(pipelined ? "2 writes in flight/" : "")write/read/GET_ID/flush; capacity \(disk.info.capacityBytes), "
            + "block \(disk.info.blockSize), \(disk.info.queueCount) queue(s), \(disk.info.segmentsPerRequest) segment(s)"
            + (spurious > 0 ? ", \(spurious) spurious notifications counted" : "")
        if wrong > 0 {
            return ProbeResult(
                signature: .wrongPayload, evidence: "\(wrong) of \(rounds) reads returned other bytes; " + detail,
                seconds: 0, canaryFound: false, neighbourOK: false, sharedBytesSearched: 0)
        }
        return ProbeResult(
            signature: .unaffected, evidence: "all intact: " + detail, seconds: 0, canaryFound: false,
            neighbourOK: false, sharedBytesSearched: 0)
    }

    /// Two writes (the halves of `bytes`) in flight together on queue 0, both waited for,
    /// then one more poll with nothing in flight.
    static func writePair(_ disk: VirtioBlockDriver, at offset: UInt64, _ bytes: [UInt8]) throws(VirtioError) {
        let q = disk.queue(0)
        let half = bytes.count / 2
        try bytes.withUnsafeBytes { b in
            Result { () throws(VirtioError) in
                try q.submitWrite(offset: offset, from: UnsafeRawBufferPointer(rebasing: b[0..<half]), tag: 1)
                try q.submitWrite(
                    offset: offset + UInt64(half), from: UnsafeRawBufferPointer(rebasing: b[half...]), tag: 2)
            }
        }.get()
        for _ in 0..<2 {
            guard let c = q.wait() else { throw .system("queue lost track of its requests") }
            if case .failure(let e) = c.result { throw e }
        }
        if let c = q.poll(), case .failure(let e) = c.result { throw e }
        if let failure = disk.failure { throw failure }
    }

    /// The signature an error maps to (its rule and kind).
    public static func signature(of error: VirtioError) -> Signature {
        switch error {
        case .violation(let v): return .violation(Signature.name(of: v))
        case .deviceViolation(let v): return .violation(Signature.name(of: v))
        case .timeout: return .timeout
        case .disconnected: return .disconnected
        case .unsupported: return .unsupported
        case .deviceError: return .deviceError
        default: return .otherError
        }
    }

    /// R6 check: a healthy device of the same process still reads back what it wrote.
    public static func neighbourWorks(_ disk: VirtioBlockDriver?) -> Bool {
        guard let disk else { return false }
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        do throws(VirtioError) {
            try disk.write(at: 1 << 20, bytes: pattern)
            return try disk.read(at: 1 << 20, count: pattern.count) == pattern && !disk.isBroken
        } catch {
            return false
        }
    }

    /// Whether `needle` occurs in `haystack` (a plain scan: megabytes, once per attack).
    public static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard let first = needle.first, needle.count <= haystack.count else { return false }
        return haystack.withUnsafeBufferPointer { h in
            needle.withUnsafeBufferPointer { n in
                guard let hb = h.baseAddress, let nb = n.baseAddress else { return false }
                var i = 0
                let last = h.count - n.count
                while i <= last {
                    if h[i] == first && memcmp(hb + i, nb, n.count) == 0 { return true }
                    i += 1
                }
                return false
            }
        }
    }
}
