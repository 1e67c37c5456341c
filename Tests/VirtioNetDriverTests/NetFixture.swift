import Foundation
import SharedMemory
import Synchronization
import VhostUser
import VirtioNet
import Virtqueue

/// serve-net back-ends running in this process, one per socket, on one fabric.
final class NetFixture: @unchecked Sendable {
    let directory: String
    let fabric: NetFabric
    var backends: [Backend] = []
    var devices: [VirtioNetDevice] = []
    var socketPaths: [String] = []
    let events = EventLog()
    private let finished = DispatchSemaphore(value: 0)

    /// `wrap` turns the real device into the one served (a hostile wrapper, for attacks).
    init(
        mode: NetFabricMode = .loopback, sockets: Int = 1, options: VirtioNetDeviceOptions = VirtioNetDeviceOptions(),
        wrap: (VirtioNetDevice) -> any VhostUserDevice = { $0 }
    ) throws {
        directory = NSTemporaryDirectory() + "rf-net-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        fabric = NetFabric(mode: mode)
        let events = self.events
        let record: @Sendable (BackendEvent) -> Void = { e in events.append(e.description) }
        for i in 0..<sockets {
            let device = VirtioNetDevice(fabric: fabric, options: options, onEvent: record)
            devices.append(device)
            var configuration = Backend.Configuration()
            configuration.messageDeadline = 1
            configuration.firstMessageDeadline = 2
            configuration.pollInterval = 0.05
            configuration.queueTiming.idleTick = 0.2
            let backend = Backend(device: wrap(device), configuration: configuration, onEvent: record)
            backends.append(backend)
            let path = directory + "/n\(i).sock"
            socketPaths.append(path)
            let listener = try UnixListener(path: path)
            let finished = self.finished
            Thread.detachNewThread {
                try? backend.run(listener: listener)
                finished.signal()
            }
        }
    }

    var socketPath: String { socketPaths[0] }

    var eventLog: [String] { events.all }

    func shutdown() {
        for b in backends { b.stop() }
        for _ in backends { finished.wait() }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// An Ethernet frame from `src` to `dst` with a payload pattern derived from `seed`.
func testFrame(dst: [UInt8], src: [UInt8], length: Int, seed: Int) -> [UInt8] {
    var f = dst + src + [0x88, 0xb5]  // local experimental EtherType
    f += (0..<max(0, length - 14)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ seed) }
    return f
}

/// Receives until `count` frames arrived or `seconds` passed.
func receiveFrames(_ pair: NetQueuePair, count: Int, frameCapacity: Int, seconds: Double = 5) throws -> [[UInt8]] {
    let batch = NetFrameBatch(capacity: 64, frameCapacity: frameCapacity)
    var got: [[UInt8]] = []
    let deadline = Deadline.after(seconds: seconds)
    while got.count < count && !deadline.hasPassed {
        batch.removeAll()
        let n = try pair.receive(into: batch)
        for i in 0..<n { got.append(batch.bytes(i)) }
        if n == 0 { _ = pair.waitForReceive(until: min(deadline, .after(seconds: 0.05))) }
    }
    return got
}

final class EventLog: Sendable {
    let lines = Mutex<[String]>([])
    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [String] { lines.withLock { $0 } }
}
