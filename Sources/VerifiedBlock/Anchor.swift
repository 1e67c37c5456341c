#if canImport(Glibc)
import Glibc
#endif

/// What the client keeps locally and trusts: the device's identity and size, the Merkle
/// root as of the last flush, the highest version that root holds, the first version
/// handed out after that flush (every later write has a version at or above it, so a crash
/// needs no list of writes in flight), and the version counter's reservation (no nonce
/// below it is ever used again).
public struct AnchorState: Equatable, Sendable {
    public var deviceID: [UInt8]
    public var blocks: UInt64
    public var root: [UInt8]
    public var committedVersion: UInt64
    public var reservedVersion: UInt64
    public var flushVersion: UInt64
}

/// The anchor file: two 4 KiB records written alternately, each with a sequence number and
/// its own SHA-256, so a crash in the middle of one leaves the other (R6 on our own side:
/// an unreadable anchor is a local error, never a guess).
final class AnchorFile {
    static let recordSize = 4096
    static let magic: [UInt8] = Array("RFVBANCH".utf8)
    static let checksumOffset = recordSize - 32

    let path: String
    let fd: Int32
    private(set) var sequence: UInt64

    private init(path: String, fd: Int32, sequence: UInt64) {
        self.path = path
        self.fd = fd
        self.sequence = sequence
    }

    deinit { close(fd) }

    static func create(path: String, state: AnchorState) throws(VerifiedBlockError) -> AnchorFile {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .local("cannot create anchor \(path): errno \(errno)") }
        let file = AnchorFile(path: path, fd: fd, sequence: 0)
        try file.store(state, sync: true)
        try file.store(state, sync: true)
        return file
    }

    static func load(path: String) throws(VerifiedBlockError) -> (AnchorFile, AnchorState) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .local("cannot open anchor \(path): errno \(errno)") }
        var best: (UInt64, AnchorState)?
        for i in 0..<2 {
            var b = [UInt8](repeating: 0, count: recordSize)
            let n = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, recordSize, off_t(i * recordSize)) }
            guard n == recordSize, let (seq, state) = decode(b) else { continue }
            if best == nil || seq > best?.0 ?? 0 { best = (seq, state) }
        }
        guard let (seq, state) = best else {
            close(fd)
            throw .local("anchor \(path) holds no valid record")
        }
        return (AnchorFile(path: path, fd: fd, sequence: seq), state)
    }

    /// Writes the next record over the older one; `sync` waits until it is on stable storage.
    func store(_ state: AnchorState, sync: Bool) throws(VerifiedBlockError) {
        let seq = sequence + 1
        let b = Self.encode(state, sequence: seq)
        let n = b.withUnsafeBytes { pwrite(fd, $0.baseAddress, Self.recordSize, off_t(Int(seq % 2) * Self.recordSize)) }
        guard n == Self.recordSize else { throw .local("cannot write anchor \(path): errno \(errno)") }
        if sync { guard fdatasync(fd) == 0 else { throw .local("cannot sync anchor \(path): errno \(errno)") } }
        sequence = seq
    }

    static func encode(_ s: AnchorState, sequence: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: recordSize)
        b.put(magic, at: 0)
        b.putLE(sequence, at: 8)
        b.put(s.deviceID, at: 16)
        b.putLE(s.blocks, at: 32)
        b.put(s.root, at: 40)
        b.putLE(s.committedVersion, at: 72)
        b.putLE(s.reservedVersion, at: 80)
        b.putLE(s.flushVersion, at: 88)
        b.put(Hash.sha256(b.slice(0, checksumOffset)), at: checksumOffset)
        return b
    }

    static func decode(_ b: [UInt8]) -> (UInt64, AnchorState)? {
        guard b.count == recordSize, b.slice(0, 8) == magic,
            Hash.sha256(b.slice(0, checksumOffset)) == b.slice(checksumOffset, 32)
        else { return nil }
        let state = AnchorState(
            deviceID: b.slice(16, 16), blocks: b.le64(at: 32), root: b.slice(40, 32),
            committedVersion: b.le64(at: 72), reservedVersion: b.le64(at: 80), flushVersion: b.le64(at: 88))
        return (b.le64(at: 8), state)
    }
}
