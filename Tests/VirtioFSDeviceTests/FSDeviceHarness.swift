import Dispatch
import Foundation
import SharedMemory
import VhostUser
@testable import VirtioFS

/// A `VirtioFSDevice` on a fresh directory (tmpfs), served in-process by the real
/// `Backend`; `root` is the served directory, `outside` a sibling the driver must never reach.
final class FSDeviceHarness: @unchecked Sendable {
    let base: String
    let root: String
    let outside: String
    let socket: String
    let device: VirtioFSDevice
    let backend: Backend
    let finished = DispatchSemaphore(value: 0)

    /// `hold`: the request queues are served through it (a device that answers late).
    init(
        readOnly: Bool = false, maximumInodes: Int = 16384, maximumHandles: Int = 4096, queues: Int = 1,
        hold: HoldSwitch? = nil
    ) throws {
        let tmp = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        base = "\(tmp)/ringfence-fsdev-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        root = "\(base)/root"
        outside = "\(base)/outside"
        socket = "\(base)/fs.sock"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        try Data("secret".utf8).write(to: URL(fileURLWithPath: "\(outside)/secret"))
        var options = VirtioFSDeviceOptions(directory: root)
        options.readOnly = readOnly
        options.maximumInodes = maximumInodes
        options.maximumHandles = maximumHandles
        options.requestQueues = queues
        options.tag = "testfs"
        let device = try VirtioFSDevice(options: options)
        self.device = device
        var configuration = Backend.Configuration()
        configuration.pollInterval = 0.05
        configuration.queueTiming.idleTick = 0.2
        backend = Backend(
            device: hold.map { HoldingFSDevice(device, hold: $0) } ?? device, configuration: configuration)
        let listener = try UnixListener(path: socket)
        let backend = self.backend
        let finished = self.finished
        Thread.detachNewThread {
            try? backend.run(listener: listener)
            finished.signal()
        }
    }

    func connect(queues: Int = 1, requestTimeout: Double = 5) throws -> VirtioFSDriver {
        var o = VirtioFSDriver.Options()
        o.queues = queues
        o.requestTimeout = requestTimeout
        return try VirtioFSDriver.connect(socket: socket, options: o)
    }

    func shutdown() {
        backend.stop()
        finished.wait()
        try? FileManager.default.removeItem(atPath: base)
    }
}

func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    return (0..<count).map { _ in
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        return UInt8(truncatingIfNeeded: x)
    }
}

extension VirtioFSDriver {
    /// A raw request with any name bytes (the malicious driver's view: no local checks).
    func raw(_ opcode: FuseProtocol.Opcode, node: UInt64, args: [UInt8], replyLimit: Int = 4096) throws(FSError)
        -> ArraySlice<UInt8>
    {
        try call(opcode, nodeID: node, args: args, replyLimit: replyLimit)
    }

    func rawLookup(_ parent: UInt64, _ name: [UInt8]) throws(FSError) -> UInt64 {
        let body = try raw(.lookup, node: parent, args: name + [0], replyLimit: FuseProtocol.entryOutSize)
        var r = FuseReader(Array(body))
        return r.get(UInt64.self) ?? 0
    }
}
