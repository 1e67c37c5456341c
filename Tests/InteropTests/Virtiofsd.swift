import Foundation

/// Debian's virtiofsd (QEMU 7.2, package qemu-system-common) serving a fresh directory on
/// tmpfs, started and stopped by a test. It serves one front-end and exits when it leaves.
final class Virtiofsd: @unchecked Sendable {
    static let path = "/usr/lib/qemu/virtiofsd"
    static var installed: Bool { FileManager.default.isExecutableFile(atPath: path) && getuid() == 0 }

    let directory: String
    let shared: String
    let socket: String
    var process: Process?

    /// Whether `deinit` removes the directory (not for a daemon sharing another's).
    let owner: Bool

    init() throws {
        let base = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        directory = "\(base)/ringfence-vfsd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        shared = "\(directory)/shared"
        socket = "\(directory)/vfs.sock"
        owner = true
        try FileManager.default.createDirectory(atPath: shared, withIntermediateDirectories: true)
        try start()
    }

    /// A second daemon on `other`'s directory (the first one exited with its front-end).
    init(sharing other: Virtiofsd) throws {
        directory = other.directory
        shared = other.shared
        socket = "\(other.directory)/vfs-\(UInt32.random(in: 0...UInt32.max)).sock"
        owner = false
        try start()
    }

    func start() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.path)
        p.arguments = ["--socket-path=\(socket)", "-o", "source=\(shared)", "-o", "cache=none"]
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

    func stop() {
        guard let p = process else { return }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        process = nil
    }

    deinit {
        stop()
        if owner {
            try? FileManager.default.removeItem(atPath: directory)
        } else {
            try? FileManager.default.removeItem(atPath: socket)
        }
    }
}
