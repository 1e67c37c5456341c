import Foundation

/// qemu-storage-daemon with one vhost-user-blk export, started and stopped by a test.
/// Images live on tmpfs (/dev/shm) so real-peer tests stay fast.
final class QemuStorageDaemon: @unchecked Sendable {
    static let path = "/usr/bin/qemu-storage-daemon"
    static var installed: Bool { FileManager.default.isExecutableFile(atPath: path) }

    enum Backing {
        /// A raw image of `size` bytes (created if missing).
        case file(size: Int)
        /// driver=null-co: reads return zeroes, writes vanish.
        case null(size: Int)
    }

    let directory: String
    let socket: String
    let image: String
    let backing: Backing
    let writable: Bool
    let queues: Int
    var process: Process?

    init(_ backing: Backing, writable: Bool = true, queues: Int = 4) throws {
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        directory = "\(base)/ringfence-qsd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        socket = "\(directory)/vhost.sock"
        image = "\(directory)/disk.img"
        self.backing = backing
        self.writable = writable
        self.queues = queues
        if case .file(let size) = backing {
            _ = FileManager.default.createFile(atPath: image, contents: nil)
            let h = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
            try h.truncate(atOffset: UInt64(size))
            try h.close()
        }
        try start()
    }

    /// Starts (or restarts) the daemon and waits until its socket accepts.
    func start() throws {
        try? FileManager.default.removeItem(atPath: socket)
        let blockdev: String
        switch backing {
        case .file: blockdev = "driver=file,node-name=disk,filename=\(image)"
        case .null(let size): blockdev = "driver=null-co,node-name=disk,size=\(size)"
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.path)
        p.arguments = [
            "--blockdev", blockdev,
            "--export",
            "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path=\(socket),writable=\(writable ? "on" : "off"),num-queues=\(queues)",
        ]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        process = p
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) {
            guard Date() < deadline, p.isRunning else { throw CocoaError(.fileNoSuchFile) }
            usleep(10_000)
        }
    }

    /// SIGSTOP: the daemon stays connected but serves nothing (a hung back-end).
    func freeze() {
        guard let p = process else { return }
        Foundation.kill(p.processIdentifier, SIGSTOP)
    }

    /// SIGKILL: no chance to finish anything (a crash).
    func kill() {
        guard let p = process else { return }
        Foundation.kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        process = nil
    }

    /// SIGKILL too: a child spawned from a Dispatch thread inherits its blocked signal
    /// mask, so qsd never sees SIGTERM.
    func stop() { kill() }

    deinit {
        stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
