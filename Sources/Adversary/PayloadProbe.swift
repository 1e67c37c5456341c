#if canImport(Glibc)
import Glibc
#endif
import BlockImage
import Foundation
import SharedMemory
import VerifiedBlock
import VirtioBlock

/// Aims a payload lie at the plain driver or at the verified layer over it, with the same
/// script: set-up (served honestly: a verified device is formatted, blocks 0..<4 written
/// twice), then three sessions of: connect (and open), rewrite blocks 0..<4, write four
/// fresh blocks, read the fresh ones back, read the rewritten ones back, flush, close.
public enum PayloadProbe {
    public enum Layer: String, Sendable, CaseIterable {
        case plain, verified
    }

    /// What the verified layer must report for each payload lie (the violation's case).
    public static let expectedVerified: [String: Signature] = [
        "payload-flip-bit": .violation("tagMismatch"),
        "payload-other-block": .violation("wrongBlock"),
        "payload-older-version": .violation("staleVersion"),
        "payload-rollback": .violation("rolledBackRoot"),
        "payload-write-dropped": .violation("writeNotStored"),
        "payload-torn-write": .violation("tornWrite"),
    ]

    /// The signatures that count as contained for `attack` against `layer`.
    public static func expected(_ attack: Attack, layer: Layer) -> Set<Signature> {
        switch layer {
        case .plain: return attack.expected
        case .verified: return expectedVerified[attack.name].map { [$0] } ?? []
        }
    }

    public static func run(_ attack: Attack?, layer: Layer, directory: String) -> ProbeResult {
        let fm = FileManager.default
        try? fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = "\(directory)/payload.img"
        func result(_ s: Signature, _ evidence: String) -> ProbeResult {
            ProbeResult(
                signature: s, evidence: evidence, seconds: 0, canaryFound: false, neighbourOK: true,
                sharedBytesSearched: 0)
        }
        guard fm.createFile(atPath: path, contents: nil), truncate(path, off_t(8 << 20)) == 0,
            let image = try? DeviceImage(path: path)
        else { return result(.otherError, "cannot create \(path)") }
        let adversary = AdversaryDevice(
            inner: VirtioBlockDevice(image: image, options: VirtioBlockDeviceOptions()), attack: attack,
            after: Int.max)
        let server = AdversaryServer(device: adversary)
        defer { server.stop() }
        let socket = "\(directory)/payload.sock"
        do { try server.start(socketPath: socket) } catch { return result(.otherError, "listen: \(error)") }
        var options = VirtioBlockDriver.Options()
        options.requestTimeout = 1.5
        options.controlTimeout = 1.0
        let key = (0..<32).map { UInt8(truncatingIfNeeded: $0 &* 29 &+ 3) }
        let anchor = "\(directory)/payload.anchor"
        let start = monotonicNanoseconds()
        let session = Session(layer: layer, socket: socket, options: options, key: key, anchor: anchor)
        var outcome: (Signature, String)
        do {
            try session.run(format: true, round: -1)
            adversary.arm()
            for round in 0..<3 { try session.run(format: false, round: round) }
            outcome = (.unaffected, "all intact: 3 sessions of rewrite/write/read/flush through the \(layer) layer")
        } catch let e as ProbeFailure {
            outcome = (e.signature, e.evidence)
        } catch {
            outcome = (.otherError, "\(error)")
        }
        var r = result(outcome.0, outcome.1)
        r.seconds = Double(monotonicNanoseconds() &- start) / 1e9
        let notes = adversary.observations.notes
        if !notes.isEmpty { r.evidence += " [device: " + notes.joined(separator: "; ") + "]" }
        return r
    }

    struct ProbeFailure: Error {
        let signature: Signature
        let evidence: String
    }

    static func content(block: UInt64, round: Int) -> [UInt8] {
        (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(block) &* 131 &+ (round + 5) &* 17) }
    }

    /// One connection's worth of the script.
    struct Session {
        let layer: Layer
        let socket: String
        let options: VirtioBlockDriver.Options
        let key: [UInt8]
        let anchor: String

        func run(format: Bool, round: Int) throws {
            let driver: VirtioBlockDriver
            do { driver = try VirtioBlockDriver.connect(socket: socket, options: options) } catch {
                throw ProbeFailure(signature: DriverProbe.signature(of: error), evidence: error.description)
            }
            defer { driver.close() }
            let disk: any Disk
            switch layer {
            case .plain: disk = PlainDisk(driver: driver)
            case .verified:
                do throws(VerifiedBlockError) {
                    disk =
                        format
                        ? try VerifiedBlockDevice.format(transport: driver, key: key, anchorPath: anchor)
                        : try VerifiedBlockDevice.open(transport: driver, key: key, anchorPath: anchor)
                } catch { throw Self.failure(error) }
            }
            let rewritten: [UInt64] = [0, 1, 2, 3]
            if format {
                for r in [-2, -1] {
                    try disk.write(rewritten, rewritten.flatMap { content(block: $0, round: r) })
                    try flush(disk)
                }
                return
            }
            let fresh: [UInt64] = (0..<4).map { 8 + 4 * UInt64(round) + $0 }
            try disk.write(rewritten, rewritten.flatMap { content(block: $0, round: round) })
            try disk.write(fresh, fresh.flatMap { content(block: $0, round: round) })
            for list in [fresh, rewritten] {
                let back = try disk.read(list)
                guard back == list.flatMap({ content(block: $0, round: round) }) else {
                    throw ProbeFailure(
                        signature: .wrongPayload,
                        evidence:
                            "session \(round): blocks \(list) read back other bytes, with status OK (\(layer) layer)")
                }
            }
            try flush(disk)
        }

        /// A verified flush failure is a `VerifiedBlockError`; name it like the others.
        func flush(_ disk: any Disk) throws {
            do { try disk.flush() } catch let e as VerifiedBlockError { throw Self.failure(e) }
        }

        static func failure(_ e: VerifiedBlockError) -> ProbeFailure {
            if case .violation(let v) = e {
                return ProbeFailure(signature: .violation(Signature.name(of: v)), evidence: v.description)
            }
            return ProbeFailure(signature: .otherError, evidence: e.description)
        }
    }
}

/// The probe's view of a disk: whole 4 KiB blocks, batches in flight together.
protocol Disk {
    func write(_ blocks: [UInt64], _ bytes: [UInt8]) throws
    func read(_ blocks: [UInt64]) throws -> [UInt8]
    func flush() throws
}

/// The plain driver: each block one request at its logical offset, one batch.
struct PlainDisk: Disk {
    let driver: VirtioBlockDriver

    func batch(_ blocks: [UInt64], _ bytes: inout [UInt8], write: Bool) throws {
        let r: Result<Void, TransportError> = bytes.withUnsafeMutableBytes { all in
            let requests = blocks.enumerated().map { k, b in
                TransportRequest(
                    offset: b * 4096,
                    buffer: UnsafeMutableRawBufferPointer(rebasing: all[(k * 4096)..<((k + 1) * 4096)]),
                    write: write)
            }
            do throws(TransportError) {
                try driver.transfer(requests)
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw PayloadProbe.ProbeFailure(signature: .otherError, evidence: e.description) }
    }

    func write(_ blocks: [UInt64], _ bytes: [UInt8]) throws {
        var copy = bytes
        try batch(blocks, &copy, write: true)
    }

    func read(_ blocks: [UInt64]) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blocks.count * 4096)
        try batch(blocks, &bytes, write: false)
        return bytes
    }

    func flush() throws {
        do throws(TransportError) { try driver.flushWrites() } catch {
            throw PayloadProbe.ProbeFailure(signature: .otherError, evidence: error.description)
        }
    }
}

extension VerifiedBlockDevice: Disk {
    func write(_ blocks: [UInt64], _ bytes: [UInt8]) throws {
        let r: Result<Void, VerifiedBlockError> = bytes.withUnsafeBytes { b in
            do throws(VerifiedBlockError) {
                try write(blocks: blocks, from: b)
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw PayloadProbe.Session.failure(e) }
    }

    func read(_ blocks: [UInt64]) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blocks.count * 4096)
        let r: Result<Void, VerifiedBlockError> = bytes.withUnsafeMutableBytes { b in
            do throws(VerifiedBlockError) {
                try read(blocks: blocks, into: b)
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = r { throw PayloadProbe.Session.failure(e) }
        return bytes
    }

}
