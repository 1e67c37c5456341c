public import VhostUser
import Virtqueue
import SharedMemory

/// Settings of a served virtio-fs device.
public struct VirtioFSDeviceOptions: Sendable {
    /// The directory served (everything the driver reaches stays beneath it).
    public var directory: String
    /// The mount tag in config space (1...36 bytes of UTF-8, no control characters).
    public var tag = "ringfence"
    public var readOnly = false
    /// Request queues (the hiprio queue is extra).
    public var requestQueues = 1
    /// Inodes the driver may hold (each is one O_PATH descriptor): past this, LOOKUP
    /// answers ENFILE until the driver forgets some.
    public var maximumInodes = 16384
    /// Open files and directories the driver may hold.
    public var maximumHandles = 4096
    /// Names one OPENDIR snapshot keeps.
    public var maximumDirectoryEntries = 1 << 20
    /// Largest WRITE and READ announced in INIT.
    public var maximumTransfer = 1 << 20

    public init(directory: String) { self.directory = directory }

    /// Why these options cannot serve.
    public func validate() -> String? {
        let t = Array(tag.utf8)
        if t.isEmpty || t.count > FSConfig.tagSize || t.contains(where: { $0 < 0x20 || $0 == 0x7f }) {
            return "tag must be 1...36 bytes of UTF-8 without control characters"
        }
        if requestQueues < 1 || requestQueues > 63 { return "request queues \(requestQueues) is not in 1...63" }
        if maximumInodes < 16 { return "at least 16 inodes" }
        if maximumHandles < 1 { return "at least 1 handle" }
        if maximumTransfer < 4096 || maximumTransfer > 1 << 20 { return "transfer limit must be 4 KiB...1 MiB" }
        return nil
    }
}

/// A virtio-fs device serving a host directory to a driver that is not trusted
/// (`ringfence serve-fs`). Semantics only; the transport is `VhostUser.Backend`'s.
///
/// Every request is copied once into private memory with bounded lengths (R2, R3) and
/// answered with a reply whose used length is exactly the reply's (Linux checks it);
/// every path operation stays beneath the directory (`HostDirectory`); the inode and
/// handle tables are bounded. One lock serializes the file-system state across queues.
public final class VirtioFSDevice: VhostUserDevice, @unchecked Sendable {
    public let options: VirtioFSDeviceOptions
    let onEvent: @Sendable (BackendEvent) -> Void
    let state: Locked<FSSession>
    let counters = FSDeviceCounters()

    public init(options: VirtioFSDeviceOptions, onEvent: @escaping @Sendable (BackendEvent) -> Void = { _ in })
        throws(FSError)
    {
        if let why = options.validate() { throw .invalidRequest(why) }
        self.options = options
        self.onEvent = onEvent
        state = Locked(
            FSSession(
                directory: try HostDirectory(
                    path: options.directory, readOnly: options.readOnly, maximumInodes: options.maximumInodes,
                    maximumHandles: options.maximumHandles, maximumDirectoryEntries: options.maximumDirectoryEntries)
            ))
    }

    public var features: UInt64 {
        FeatureBits.version1 | FeatureBits.ringIndirectDescriptors | FeatureBits.ringEventIndex
            | FeatureBits.ringPacked
    }

    public var protocolFeatures: ProtocolFeatures { .config }

    public var queueCount: Int { 1 + options.requestQueues }

    public var config: FSConfig { FSConfig(tag: options.tag, numRequestQueues: UInt32(options.requestQueues)) }

    public func readConfig(offset: UInt32, size: Int) -> [UInt8]? { config.read(offset: offset, size: size) }

    public func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool { false }

    public func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler {
        FSRequestHandler(device: self, queue: queue)
    }

    /// The driver left: every inode (but the root) and handle is closed, INIT is due again.
    public func frontendDisconnected() {
        state.withLock { s in
            s.directory.reset()
            s.initialized = false
        }
    }

    /// Requests by class, file bytes read and written, failures and violations by rule,
    /// since the device was made (every connection; `ringfence serve-fs --metrics`).
    public var statistics: FSDeviceStatistics { counters.state.withLock { $0 } }

    /// Inodes and handles the driver holds now (for tests and logs).
    public var held: (inodes: Int, handles: Int) {
        state.withLock { s in (s.directory.inodeCount, s.directory.handleCount) }
    }
}

/// The file-system state of one connection, under the device's lock.
struct FSSession {
    var directory: HostDirectory
    var initialized = false
}
