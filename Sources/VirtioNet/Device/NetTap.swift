#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import Synchronization

/// A Linux TAP interface as a port of a `NetFabric` (`serve-net --switch --tap NAME`): a
/// hardened vhost-user-net back-end to the host. Frames from the kernel are checked for
/// length like a driver's, then switched; frames for the TAP are written to it (a full
/// TAP queue drops, never blocks: the descriptor is non-blocking).
public final class NetTap: @unchecked Sendable {
    public let name: String
    let fd: Int32
    let maximumFrame: Int
    let stopping = Atomic<Bool>(false)
    let fabric: NetFabric
    var port: NetPort?
    var thread: SpawnedThread?

    static let tunSetIFF: UInt = 0x4004_54ca
    static let iffTap: Int16 = 0x0002
    static let iffNoPI: Int16 = 0x1000

    public enum Error: Swift.Error, CustomStringConvertible {
        case open(String)
        public var description: String {
            switch self {
            case .open(let why): return why
            }
        }
    }

    /// Creates (or attaches to) TAP `name` and starts forwarding between it and `fabric`.
    public init(name: String, fabric: NetFabric, mtu: Int = NetProtocol.defaultMTU) throws(Error) {
        guard !name.isEmpty, name.utf8.count < 16 else { throw .open("TAP name '\(name)' must be 1...15 bytes") }
        let fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw .open("open /dev/net/tun: \(String(cString: strerror(errno)))") }
        var ifr = ifreq()
        withUnsafeMutableBytes(of: &ifr.ifr_ifrn.ifrn_name) { raw in
            for (i, b) in name.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
        }
        ifr.ifr_ifru.ifru_flags = Self.iffTap | Self.iffNoPI
        let rc = withUnsafeMutablePointer(to: &ifr) { ioctl(fd, Self.tunSetIFF, $0) }
        guard rc == 0 else {
            let why = String(cString: strerror(errno))
            close(fd)
            throw .open("TUNSETIFF \(name): \(why)")
        }
        self.name = name
        self.fd = fd
        self.fabric = fabric
        self.maximumFrame = mtu + NetProtocol.ethernetHeaderSize + NetProtocol.vlanTagSize
        let port = fabric.register(inboxes: [], tap: self)
        self.port = port
        do {
            thread = try spawnThread { [self] in run(port) }
        } catch {
            close(fd)
            throw .open("thread: \(error)")
        }
    }

    deinit { close(fd) }

    /// Stops the reading thread (within 100 ms) and detaches the TAP from the fabric.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        thread?.join()
        thread = nil
        if let port { fabric.forgetAddresses(port: port.id) }
    }

    /// Kernel -> fabric: one frame per read, length-checked, forwarded as a port's.
    func run(_ port: NetPort) {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 64)
        defer { buffer.deallocate() }
        var ref = FrameRef(base: UnsafeRawPointer(buffer), length: 0)
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        while !stopping.load(ordering: .acquiring) {
            guard poll(&pfd, 1, 100) > 0 else { continue }
            while true {
                let n = read(fd, buffer, 65536)
                guard n > 0 else { break }
                guard n >= NetProtocol.ethernetHeaderSize, n <= maximumFrame else {
                    fabric.rejected(1)
                    continue
                }
                ref.length = n
                withUnsafePointer(to: ref) { fabric.forward($0, count: 1, from: port, pair: 0) }
            }
        }
    }

    /// Fabric -> kernel (any port's transmit thread); never blocks.
    func write(_ frames: UnsafePointer<FrameRef>, count: Int) -> Int {
        var written = 0
        for i in 0..<count where Glibc.write(fd, frames[i].base, frames[i].length) == frames[i].length {
            written += 1
        }
        return written
    }
}
