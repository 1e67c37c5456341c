#if canImport(Glibc)
import Glibc
#endif
import Foundation
public import SharedMemory
public import VhostUser
public import VirtioFS
import Virtqueue

/// The fs section of the catalogue: a malicious virtio-fs device, as data. Each attack
/// is played by `FSAdversaryDevice` on the real `VirtioFSDevice` (its requests are
/// executed for real, then the reply, its used length or the config is forged).
public struct FSAttack: Sendable, Hashable, CustomStringConvertible {
    public let name: String
    public let rule: Rule
    /// Which replies are forged.
    public let target: Target
    public let behaviour: FSBehaviour
    public let summary: String
    /// What a hardened driver must do: the `FSError` case names that count as contained
    /// (`errno`: a plain answer, the driver stays usable; `unaffected`: no error at all).
    public let expected: Set<String>

    public enum Target: Sendable, Hashable {
        case opcode(FuseProtocol.Opcode)
        case config
    }

    public var description: String { "\(name) (\(rule.rawValue)): \(summary)" }
}

/// How an fs attack misbehaves.
public enum FSBehaviour: Sendable, Hashable {
    /// Used length `delta` bytes away from out.len (out.len itself honest).
    case usedLengthDelta(Int)
    /// out.len `delta` bytes away from the used length.
    case outLengthDelta(Int)
    case uniqueOffset(UInt64)
    case uniqueZero
    case error(Int32)
    /// An error with the success body kept behind it.
    case errorWithBody
    case initMajor(UInt32)
    case initMaxWrite(UInt32)
    case entryNodeID(UInt64)
    /// The mode of every attribute after the entry/attr header rewritten.
    case attributeMode(UInt32)
    case attributeSize(UInt64)
    /// First directory entry's name length (0, 4095, past the reply).
    case direntNameLength(UInt32)
    /// Last directory entry's name length.
    case lastDirentNameLength(UInt32)
    /// First directory entry's name bytes.
    case direntName([UInt8])
    /// Drops the 8-byte alignment padding of the first entry.
    case direntMisaligned
    /// Every entry's offset set to 1: a listing that never ends.
    case direntOffsetsRepeat
    case direntNodeID(UInt64)
    /// Completes a request without reply (FORGET) with `n` bytes.
    case replyOnHiprio(UInt32)
    case neverReply
    /// Rewrites the reply's unique from a thread for 20 ms after completing it.
    case toctouReply
    case tag([UInt8])
    case numRequestQueues(UInt32)
}

public enum FSCatalogue {
    static func a(
        _ name: String, _ rule: Rule, _ target: FSAttack.Target, _ behaviour: FSBehaviour, _ summary: String,
        _ expected: Set<String>
    ) -> FSAttack {
        FSAttack(name: name, rule: rule, target: target, behaviour: behaviour, summary: summary, expected: expected)
    }

    public static func attack(named name: String) -> FSAttack? { all.first { $0.name == name } }

    public static let all: [FSAttack] = [
        a(
            "fs-used-len-short", .r3, .opcode(.getattr), .usedLengthDelta(-8),
            "reports a used length 8 bytes below out.len", ["replyLengthMismatch"]),
        a(
            "fs-out-len-long", .r3, .opcode(.getattr), .outLengthDelta(8),
            "writes out.len 8 bytes above the used length", ["replyLengthMismatch"]),
        a(
            "fs-out-len-short", .r3, .opcode(.getattr), .outLengthDelta(-8),
            "writes out.len 8 bytes below the used length", ["replyLengthMismatch"]),
        a(
            "fs-used-len-beyond-posted", .r3, .opcode(.getattr), .usedLengthDelta(4096),
            "reports 4096 bytes more than the driver posted", ["usedLengthTooLarge"]),
        a(
            "fs-unique-other", .r3, .opcode(.getattr), .uniqueOffset(2),
            "answers with the unique of another request", ["uniqueMismatch"]),
        a(
            "fs-unique-none", .r3, .opcode(.getattr), .uniqueZero,
            "answers with unique 0 (no request)", ["uniqueMismatch"]),
        a(
            "fs-error-positive", .r3, .opcode(.getattr), .error(5),
            "answers error +5", ["errorOutOfRange"]),
        a(
            "fs-error-huge", .r3, .opcode(.getattr), .error(-5000),
            "answers error -5000", ["errorOutOfRange"]),
        a(
            "fs-error-with-body", .r3, .opcode(.getattr), .errorWithBody,
            "answers -EIO with the attribute body still behind it", ["errorWithBody"]),
        a(
            "fs-init-major-8", .r3, .opcode(.initialize), .initMajor(8),
            "answers INIT with major version 8", ["initVersion"]),
        a(
            "fs-init-max-write-huge", .r3, .opcode(.initialize), .initMaxWrite(UInt32.max),
            "answers INIT with max_write 2^32-1 (clamped, not trusted)", ["unaffected"]),
        a(
            "fs-lookup-nodeid-0", .r3, .opcode(.lookup), .entryNodeID(0),
            "answers LOOKUP with nodeid 0 (a negative entry: not found)", ["errno"]),
        a(
            "fs-lookup-nodeid-1", .r3, .opcode(.lookup), .entryNodeID(1),
            "answers LOOKUP of a child with the root's nodeid", ["nodeIDInvalid"]),
        a(
            "fs-type-change", .r3, .opcode(.getattr), .attributeMode(0o040755),
            "reports a known regular file as a directory", ["typeChanged"]),
        a(
            "fs-attr-no-type", .r3, .opcode(.getattr), .attributeMode(0o644),
            "reports a mode with no file type", ["attributeType"]),
        a(
            "fs-size-huge", .r3, .opcode(.getattr), .attributeSize(UInt64.max),
            "reports a file size above Int64.max", ["attributeSize"]),
        a(
            "fs-dirent-namelen-0", .r3, .opcode(.readdirplus), .direntNameLength(0),
            "a directory entry with name length 0", ["direntNameLength"]),
        a(
            "fs-dirent-namelen-4095", .r3, .opcode(.readdirplus), .direntNameLength(4095),
            "a directory entry with name length 4095", ["direntNameLength"]),
        a(
            "fs-dirent-past-buffer", .r3, .opcode(.readdirplus), .lastDirentNameLength(255),
            "the last directory entry's name (255 bytes) runs past the reply", ["direntPastBuffer"]),
        a(
            "fs-dirent-misaligned", .r3, .opcode(.readdirplus), .direntMisaligned,
            "a directory entry without its alignment padding", ["direntPastBuffer", "direntNameLength"]),
        a(
            "fs-dirent-name-slash", .r3, .opcode(.readdirplus), .direntName(Array("../x".utf8)),
            "a directory entry named ../x", ["direntName"]),
        a(
            "fs-dirent-name-nul", .r3, .opcode(.readdirplus), .direntName([0x61, 0, 0x62, 0x63]),
            "a directory entry with a NUL inside its name", ["direntName"]),
        a(
            "fs-readdir-offsets-repeat", .r5, .opcode(.readdirplus), .direntOffsetsRepeat,
            "every directory offset is 1: the listing starts over forever", ["direntOffset"]),
        a(
            "fs-readdir-nodeid-0", .r3, .opcode(.readdirplus), .direntNodeID(0),
            "a directory entry with nodeid 0", ["nodeIDInvalid"]),
        a(
            "fs-readdir-nodeid-1", .r3, .opcode(.readdirplus), .direntNodeID(1),
            "a directory entry with the root's nodeid", ["nodeIDInvalid"]),
        a(
            "fs-reply-on-hiprio", .r3, .opcode(.forget), .replyOnHiprio(16),
            "completes a FORGET on the hiprio queue with 16 bytes", ["usedLengthTooLarge", "unexpectedReply"]),
        a(
            "fs-never-reply", .r5, .opcode(.getattr), .neverReply,
            "never completes a GETATTR", ["timeout"]),
        a(
            "fs-toctou-reply", .r2, .opcode(.getattr), .toctouReply,
            "rewrites the reply's unique from a thread right after completing it", ["unaffected", "uniqueMismatch"]),
        a(
            "fs-tag-newline", .r3, .config, .tag(Array("evil\nroot".utf8)),
            "a tag with a newline in it", ["configInvalid"]),
        a(
            "fs-tag-without-nul", .r3, .config, .tag(Array(repeating: 0x74, count: 36)),
            "a tag filling all 36 bytes, no NUL (allowed by the spec)", ["unaffected"]),
        a(
            "fs-request-queues-0", .r3, .config, .numRequestQueues(0),
            "num_request_queues 0", ["configInvalid"]),
    ]
}

/// The real `VirtioFSDevice`, misbehaving at the hook points: config space and each
/// request queue's completions.
public final class FSAdversaryDevice: VhostUserDevice, @unchecked Sendable {
    public let inner: VirtioFSDevice
    public let attack: FSAttack?

    public init(inner: VirtioFSDevice, attack: FSAttack?) {
        self.inner = inner
        self.attack = attack
    }

    public var features: UInt64 { inner.features }
    public var protocolFeatures: ProtocolFeatures { inner.protocolFeatures }
    public var queueCount: Int { inner.queueCount }

    public func readConfig(offset: UInt32, size: Int) -> [UInt8]? {
        var config = inner.config
        switch attack?.behaviour {
        case .tag(let t)?: config.tag = t
        case .numRequestQueues(let n)?: config.numRequestQueues = n
        default: break
        }
        return config.read(offset: offset, size: size)
    }

    public func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }

    public func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        guard let handler = inner.makeQueueHandler(queue: queue, features: features) as? FSRequestHandler else {
            return inner.makeQueueHandler(queue: queue, features: features)
        }
        return FSAdversaryQueueHandler(inner: handler, attack: attack)
    }

    public func frontendDisconnected() { inner.frontendDisconnected() }
}

/// Executes each chain on the real handler, then forges the reply the attack targets.
final class FSAdversaryQueueHandler: QueueHandler {
    let inner: FSRequestHandler
    let attack: FSAttack?
    var chain = DescriptorChain()
    /// Chains popped and never completed (`neverReply`).
    var withheld: [UInt16] = []
    /// The mappings a racing thread writes into: it holds them until it is done, so a
    /// disconnect cannot unmap them under it.
    var memory = GuestMemory()

    init(inner: FSRequestHandler, attack: FSAttack?) {
        self.inner = inner
        self.attack = attack
    }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        var count = 0
        while count < budget {
            switch try queue.nextChain(into: &chain, memory: memory) {
            case .empty: return count
            case .rejected(let head, _): queue.complete(head: head, length: 0)
            case .ready:
                let opcode = requestOpcode()
                var length = inner.execute(chain)
                if let attack, case .opcode(let target) = attack.target, target.rawValue == opcode {
                    self.memory = memory
                    guard let forged = forge(attack.behaviour, length: length) else {
                        withheld.append(chain.head)
                        count += 1
                        continue
                    }
                    length = forged
                }
                queue.complete(head: chain.head, length: length)
            }
            count += 1
        }
        return count
    }

    func requestOpcode() -> UInt32 {
        var header = [UInt8](repeating: 0, count: 8)
        copy(chain.readable, at: 0, count: 8, into: &header)
        var r = FuseReader(header, offset: 4)
        return r.get(UInt32.self) ?? 0
    }

    /// Forges the reply just executed; returns the used length to report (nil: never).
    func forge(_ behaviour: FSBehaviour, length: UInt32) -> UInt32? {
        let n = Int(length)
        var reply = [UInt8](repeating: 0, count: n)
        copy(chain.writable, at: 0, count: n, into: &reply)
        func put<T: FixedWidthInteger>(_ v: T, at offset: Int) {
            guard offset >= 0, offset + MemoryLayout<T>.size <= reply.count else { return }
            for i in 0..<MemoryLayout<T>.size { reply[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
        }
        var used = length
        let header = FuseProtocol.outHeaderSize
        switch behaviour {
        case .usedLengthDelta(let d): used = UInt32(clamping: Int(length) + d)
        case .outLengthDelta(let d): put(UInt32(clamping: Int(length) + d), at: 0)
        case .uniqueOffset(let d):
            var r = FuseReader(reply, offset: 8)
            put((r.get(UInt64.self) ?? 0) &+ d, at: 8)
        case .uniqueZero: put(UInt64(0), at: 8)
        case .error(let e): put(e, at: 4)
        case .errorWithBody: put(Int32(-EIO), at: 4)
        case .initMajor(let m): put(m, at: header)
        case .initMaxWrite(let w): put(w, at: header + 20)
        case .entryNodeID(let id): put(id, at: header)
        case .attributeMode(let mode): put(mode, at: header + 16 + 60)
        case .attributeSize(let size): put(size, at: header + 16 + 8)
        case .direntNameLength(let l): put(l, at: header + FuseProtocol.entryOutSize + 16)
        case .lastDirentNameLength(let l):
            var at = header
            var last = header
            while at + FuseProtocol.direntplusHeaderSize <= n {
                last = at
                var r = FuseReader(reply, offset: at + FuseProtocol.entryOutSize + 16)
                at += (FuseProtocol.direntplusHeaderSize + Int(r.get(UInt32.self) ?? 0) + 7) & ~7
            }
            put(l, at: last + FuseProtocol.entryOutSize + 16)
        case .direntName(let name):
            // Overwrites the first entry's name in place (same length when it fits).
            let at = header + FuseProtocol.direntplusHeaderSize
            for (i, b) in name.enumerated() where at + i < reply.count { reply[at + i] = b }
            put(UInt32(name.count), at: header + FuseProtocol.entryOutSize + 16)
        case .direntMisaligned:
            // One byte less: the reply is no longer a whole number of padded entries.
            guard n > header + 1 else { return length }
            used = length - 1
            put(used, at: 0)
            return forgeDone(reply, used)
        case .direntOffsetsRepeat:
            var at = header
            while at + FuseProtocol.direntplusHeaderSize <= n {
                var r = FuseReader(reply, offset: at + FuseProtocol.entryOutSize + 16)
                let nameLength = Int(r.get(UInt32.self) ?? 0)
                put(UInt64(1), at: at + FuseProtocol.entryOutSize + 8)
                at += (FuseProtocol.direntplusHeaderSize + nameLength + 7) & ~7
            }
        case .direntNodeID(let id): put(id, at: header)
        case .replyOnHiprio(let bytes): return bytes
        case .neverReply: return nil
        case .toctouReply:
            let segments = chain.writable
            let mappings = memory
            Thread.detachNewThread {
                withExtendedLifetime(mappings) {
                    let end = Date().addingTimeInterval(0.02)
                    while Date() < end {
                        for s in segments where s.buffer.count >= 16 {
                            s.buffer.storeBytes(of: UInt64(0xdead_beef), toByteOffset: 8, as: UInt64.self)
                        }
                    }
                }
            }
            return length
        case .tag, .numRequestQueues: return length
        }
        return forgeDone(reply, used)
    }

    func forgeDone(_ reply: [UInt8], _ used: UInt32) -> UInt32 {
        write(reply, into: chain.writable)
        return used
    }

    func copy(_ segments: ArraySlice<ChainSegment>, at offset: Int, count: Int, into out: inout [UInt8]) {
        var skip = offset
        var done = 0
        for s in segments where done < count {
            if skip >= s.buffer.count {
                skip -= s.buffer.count
                continue
            }
            let k = min(s.buffer.count - skip, count - done)
            for i in 0..<k { out[done + i] = s.buffer[skip + i] }
            done += k
            skip = 0
        }
    }

    func write(_ bytes: [UInt8], into segments: ArraySlice<ChainSegment>) {
        var done = 0
        for s in segments where done < bytes.count {
            let k = min(s.buffer.count, bytes.count - done)
            for i in 0..<k { s.buffer[i] = bytes[done + i] }
            done += k
        }
    }
}
