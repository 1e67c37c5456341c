import Dispatch
import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioFS

@testable import Adversary

/// Every attack of the fs catalogue against our virtio-fs driver: the outcome is one the
/// attack lists as contained (a named violation, an errno, or nothing), a broken driver
/// stays broken (R6), and a healthy device in the same process is still served (§1.5).
/// A served directory behind `FSAdversaryDevice`.
final class FSAttackBed: @unchecked Sendable {
    let base: String
    let socket: String
    let backend: Backend
    let finished = DispatchSemaphore(value: 0)

    init(_ attack: FSAttack?) throws {
        let tmp = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        base = "\(tmp)/ringfence-fsadv-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: "\(base)/root", withIntermediateDirectories: true)
        for name in ["a", "b", "c"] {
            try Data(name.utf8).write(to: URL(fileURLWithPath: "\(base)/root/\(name)"))
        }
        socket = "\(base)/fs.sock"
        var options = VirtioFSDeviceOptions(directory: "\(base)/root")
        options.tag = "adv"
        let device = FSAdversaryDevice(inner: try VirtioFSDevice(options: options), attack: attack)
        var configuration = Backend.Configuration()
        configuration.pollInterval = 0.05
        configuration.queueTiming.idleTick = 0.2
        backend = Backend(device: device, configuration: configuration)
        let listener = try UnixListener(path: socket)
        let backend = self.backend
        let finished = self.finished
        Thread.detachNewThread {
            try? backend.run(listener: listener)
            finished.signal()
        }
    }

    func shutdown() {
        backend.stop()
        finished.wait()
        try? FileManager.default.removeItem(atPath: base)
    }
}

@Suite(.serialized)
struct FSAttackTests {
    /// The probe: what a user does first. Returns the first error, and whether the driver
    /// reported itself broken afterwards.
    static func probe(_ socket: String) -> (error: FSError?, broken: Bool) {
        var o = VirtioFSDriver.Options()
        o.requestTimeout = 2
        o.controlTimeout = 5
        let fs: VirtioFSDriver
        do throws(FSError) {
            fs = try VirtioFSDriver.connect(socket: socket, options: o)
        } catch {
            return (error, true)
        }
        defer { fs.close() }
        do throws(FSError) {
            _ = try fs.stat("/")
            try fs.writeFile("probe.txt", bytes: Array(repeating: 0x5a, count: 100))
            _ = try fs.stat("probe.txt")
            _ = try fs.readFile("probe.txt")
            _ = try fs.listDirectory("/")
            try fs.flushForgets()
            _ = try fs.stat("a")
            try fs.flushForgets()
        } catch {
            // Once broken, every later call fails with the same failure (R6).
            if fs.isBroken {
                var again: FSError? = nil
                do throws(FSError) { _ = try fs.stat("/") } catch { again = error }
                #expect(again == fs.failure, "sticky failure")
            }
            return (error, fs.isBroken)
        }
        return (nil, fs.isBroken)
    }

    static func caseName(_ e: FSError?) -> String {
        switch e {
        case nil: return "unaffected"
        case .errno?: return "errno"
        case .timeout?: return "timeout"
        case .violation(let v)?: return Mirror(reflecting: v).children.first?.label ?? "\(v)"
        case .deviceViolation(let v)?: return Mirror(reflecting: v).children.first?.label ?? "\(v)"
        case let other?: return "\(other)"
        }
    }

    @Test(arguments: FSCatalogue.all)
    func attackIsContained(_ attack: FSAttack) throws {
        let bed = try FSAttackBed(attack)
        defer { bed.shutdown() }
        let healthy = try FSAttackBed(nil)
        defer { healthy.shutdown() }
        let (error, broken) = Self.probe(bed.socket)
        let outcome = Self.caseName(error)
        #expect(attack.expected.contains(outcome), "\(attack.name): \(error.map { "\($0)" } ?? "no error")")
        // A violation or timeout names its rule and breaks the driver; an errno does not.
        if let rule = error?.rule {
            #expect(broken)
            #expect("\(error!)".hasPrefix(rule.rawValue))
        } else {
            #expect(!broken, "\(attack.name): a plain answer must not break the driver")
        }
        // The healthy device next to it is untouched.
        let (healthyError, _) = Self.probe(healthy.socket)
        #expect(healthyError == nil, "healthy device: \(healthyError.map { "\($0)" } ?? "")")
    }

    @Test func catalogueNamesAreUnique() {
        #expect(Set(FSCatalogue.all.map(\.name)).count == FSCatalogue.all.count)
    }
}

/// `read(_:at:into:)` (READ straight into the caller's buffer, only the reply header
/// copied privately) is held to every reply check the copying `read(_:at:count:)` is:
/// each reply-header attack of the catalogue, aimed at READ, ends both the same way.
@Suite(.serialized)
struct FSReadIntoTests {
    /// One READ of file "a" (one byte, "a") through a fresh driver: the outcome's case
    /// name, whether the driver broke, and the bytes read.
    static func readOnce(_ socket: String, intoBuffer: Bool) -> (outcome: String, broken: Bool, bytes: [UInt8]) {
        var o = VirtioFSDriver.Options()
        o.requestTimeout = 2
        o.controlTimeout = 5
        let fs: VirtioFSDriver
        do throws(FSError) {
            fs = try VirtioFSDriver.connect(socket: socket, options: o)
        } catch {
            return (FSAttackTests.caseName(error), true, [])
        }
        defer { fs.close() }
        do throws(FSError) {
            let e = try fs.lookup(parent: FuseProtocol.rootNodeID, name: "a")
            let h = try fs.open(e.nodeID)
            var bytes: [UInt8]
            if intoBuffer {
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
                defer { buffer.deallocate() }
                buffer.initializeMemory(as: UInt8.self, repeating: 0xee)
                let n = try fs.read(h, at: 0, into: buffer)
                bytes = Array(buffer[0..<n])
            } else {
                bytes = try fs.read(h, at: 0, count: 4096)
            }
            return ("unaffected", fs.isBroken, bytes)
        } catch {
            return (FSAttackTests.caseName(error), fs.isBroken, [])
        }
    }

    static let headerAttacks: [FSAttack] = FSCatalogue.all.filter {
        switch $0.behaviour {
        case .usedLengthDelta, .outLengthDelta, .uniqueOffset, .uniqueZero, .error, .errorWithBody: return true
        default: return false
        }
    }.map {
        FSAttack(
            name: $0.name, rule: $0.rule, target: .opcode(.read), behaviour: $0.behaviour, summary: $0.summary,
            expected: $0.expected)
    }

    @Test(arguments: headerAttacks)
    func readIntoABufferIsCheckedAsACopiedRead(_ attack: FSAttack) throws {
        let bed = try FSAttackBed(attack)
        defer { bed.shutdown() }
        let copied = Self.readOnce(bed.socket, intoBuffer: false)
        let direct = Self.readOnce(bed.socket, intoBuffer: true)
        #expect(copied.outcome != "unaffected", "\(attack.name): the copying read must notice")
        #expect(direct.outcome == copied.outcome, "\(attack.name)")
        #expect(direct.broken == copied.broken, "\(attack.name)")
        #expect(direct.bytes.isEmpty)
    }

    @Test func readIntoABufferReadsWhatTheHostHasAndStopsAtTheEnd() throws {
        let bed = try FSAttackBed(nil)
        defer { bed.shutdown() }
        let r = Self.readOnce(bed.socket, intoBuffer: true)
        #expect(r.outcome == "unaffected")
        #expect(!r.broken)
        #expect(r.bytes == Array("a".utf8))
    }
}
