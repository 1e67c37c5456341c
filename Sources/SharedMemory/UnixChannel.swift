#if canImport(Glibc)
import Glibc
#endif
internal import CRingFence

/// A connected `AF_UNIX` stream socket that carries bytes and file descriptors.
///
/// Sends use MSG_NOSIGNAL (a dead peer is an error, never SIGPIPE — rule R4). Receives use
/// MSG_CMSG_CLOEXEC; descriptors beyond what the caller accepts are closed, MSG_CTRUNC is
/// an error, and every receive has a deadline (rule R5).
public final class UnixChannel: @unchecked Sendable {
    // @unchecked Sendable: an immutable descriptor; the kernel serializes socket calls (one
    // reader and one writer at a time is the callers' contract, as for any socket).
    public let fileDescriptor: Int32
    public static let maximumDescriptors = 16

    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case system(SystemError)
        case closed
        case timedOut
        case controlTruncated
        case pathTooLong(String)

        public var description: String {
            switch self {
            case .system(let e): return e.description
            case .closed: return "peer closed the connection"
            case .timedOut: return "timed out waiting for the peer"
            case .controlTruncated: return "ancillary data truncated (MSG_CTRUNC)"
            case .pathTooLong(let p): return "socket path too long: \(p)"
            }
        }
    }

    public init(adopting fd: Int32) { fileDescriptor = fd }

    deinit { closeDescriptor(fileDescriptor) }

    /// A connected pair (for a child process or an in-process peer).
    public static func pair() throws(Error) -> (UnixChannel, UnixChannel) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0
        else { throw .system(.current("socketpair")) }
        return (UnixChannel(adopting: fds[0]), UnixChannel(adopting: fds[1]))
    }

    /// Connects to a listening socket at `path`. A listener that never accepts (its
    /// backlog full) cannot hold us past `deadline` (R5): the connect is non-blocking and
    /// retried until then.
    public static func connect(path: String, until deadline: Deadline = .after(seconds: 10)) throws(Error)
        -> UnixChannel
    {
        let fd = socket(
            AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw .system(.current("socket")) }
        do throws(Error) {
            try withSocketAddress(path) { (addr, len) throws(Error) in
                while Glibc.connect(fd, addr, len) != 0 {
                    if errno == EINTR { continue }
                    // AF_UNIX reports a full backlog as EAGAIN (there is nothing to poll for).
                    guard errno == EAGAIN, !deadline.hasPassed else {
                        if errno == EAGAIN { throw .timedOut }
                        throw .system(.current("connect(\(path))"))
                    }
                    usleep(1000)
                }
            }
            // Every operation is non-blocking per call anyway; the mode is left as it was.
            let flags = fcntl(fd, F_GETFL)
            guard flags >= 0, fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == 0 else {
                throw .system(.current("fcntl"))
            }
        } catch {
            closeDescriptor(fd)
            throw error
        }
        return UnixChannel(adopting: fd)
    }

    /// How long a send may wait for a peer that does not read, unless the caller says.
    public static let defaultSendTimeout: Double = 30

    /// Sends all of `bytes` with `descriptors` attached to the first chunk. A peer that
    /// stops reading cannot block us past `deadline` (R5): `.timedOut`, after which the
    /// stream is out of step and the connection should be dropped. Descriptors need at
    /// least one byte to travel with (a stream socket drops them from an empty send).
    public func send(
        _ bytes: UnsafeRawBufferPointer, descriptors: [Int32] = [],
        until deadline: Deadline = .after(seconds: UnixChannel.defaultSendTimeout)
    ) throws(Error) {
        guard bytes.count > 0 else {
            if descriptors.isEmpty { return }
            throw .system(SystemError("sendmsg", errno: .invalidArgument))
        }
        var sent = 0
        var fds = descriptors
        while sent < bytes.count {
            let n = fds.withUnsafeBufferPointer { fdp in
                rf_send_with_fds_nowait(
                    fileDescriptor, bytes.baseAddress.map { $0 + sent }, bytes.count - sent,
                    fdp.baseAddress, Int32(fdp.count))
            }
            if n < 0 {
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    try waitWritable(until: deadline)
                    continue
                }
                if errno == EPIPE || errno == ECONNRESET { throw .closed }
                throw .system(.current("sendmsg"))
            }
            fds = []
            sent += n
        }
    }

    public func send(
        _ bytes: [UInt8], descriptors: [Int32] = [],
        until deadline: Deadline = .after(seconds: UnixChannel.defaultSendTimeout)
    ) throws(Error) {
        let result = bytes.withUnsafeBytes { b in
            Result { () throws(Error) in try send(b, descriptors: descriptors, until: deadline) }
        }
        try result.get()
    }

    /// Waits until writable (or the peer hung up) or the deadline passes.
    public func waitWritable(until deadline: Deadline) throws(Error) {
        while true {
            var pfd = pollfd(fd: fileDescriptor, events: Int16(POLLOUT), revents: 0)
            let r = poll(&pfd, 1, deadline.pollTimeoutMilliseconds)
            if r > 0 { return }
            if r == 0 { throw .timedOut }
            if errno != EINTR { throw .system(.current("poll")) }
        }
    }

    /// Makes the socket non-blocking, so no send or receive can block past a deadline
    /// (receives already poll first; sends then wait for room with a deadline).
    public func setNonBlocking() throws(Error) {
        let flags = fcntl(fileDescriptor, F_GETFL)
        guard flags >= 0, fcntl(fileDescriptor, F_SETFL, flags | O_NONBLOCK) == 0 else {
            throw .system(.current("fcntl(O_NONBLOCK)"))
        }
    }

    /// Waits until readable or the deadline passes.
    public func waitReadable(until deadline: Deadline) throws(Error) {
        while true {
            var pfd = pollfd(fd: fileDescriptor, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, deadline.pollTimeoutMilliseconds)
            if r > 0 { return }
            if r == 0 { throw .timedOut }
            if errno != EINTR { throw .system(.current("poll")) }
        }
    }

    /// Receives exactly `buffer.count` bytes. Descriptors that arrive with them (up to
    /// `maxDescriptors`) are returned; the caller owns them. Surplus ones are closed.
    public func receive(
        exactly buffer: UnsafeMutableRawBufferPointer, maxDescriptors: Int, until deadline: Deadline
    ) throws(Error) -> [Int32] {
        var got = 0
        var descriptors: [Int32] = []
        do throws(Error) {
            // Read first (the receive never blocks: MSG_DONTWAIT) and poll only when
            // nothing is there yet: a message that has already arrived costs one syscall.
            while got < buffer.count {
                let limit = max(0, min(maxDescriptors - descriptors.count, Self.maximumDescriptors))
                var nfds: Int32 = 0
                var stray: Int32 = 0
                var truncated: Int32 = 0
                // Stack room for what one recvmsg can carry.
                let n = withUnsafeTemporaryAllocation(of: Int32.self, capacity: Self.maximumDescriptors) { fds in
                    let n = rf_recv_with_fds(
                        fileDescriptor, buffer.baseAddress.map { $0 + got }, buffer.count - got, fds.baseAddress,
                        Int32(limit), &nfds, &stray, &truncated)
                    if n >= 0 { descriptors.append(contentsOf: fds.prefix(Int(nfds))) }
                    return n
                }
                if n < 0 {
                    if errno == EAGAIN || errno == EWOULDBLOCK {
                        try waitReadable(until: deadline)
                        continue
                    }
                    if errno == ECONNRESET { throw Error.closed }
                    throw Error.system(.current("recvmsg"))
                }
                if truncated != 0 { throw Error.controlTruncated }
                if n == 0 { throw Error.closed }
                got += n
            }
        } catch {
            for fd in descriptors { closeDescriptor(fd) }
            throw error
        }
        return descriptors
    }

    /// Half-closes both directions (wakes a peer blocked on us).
    /// What a readable stream socket means, found without consuming a byte or blocking:
    /// the peer spoke, hung up, or nothing is there after all.
    public enum PeerState: Equatable, Sendable { case quiet, spoke, hungUp }

    /// Peeks at `fd` (MSG_PEEK | MSG_DONTWAIT), for a control socket a peer may only
    /// answer on: readable then means it closed, or spoke unasked.
    public static func peerState(of fd: Int32) -> PeerState {
        var byte: UInt8 = 0
        while true {
            let n = recv(fd, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
            if n > 0 { return .spoke }
            if n == 0 { return .hungUp }
            if errno == EINTR { continue }
            return errno == EAGAIN ? .quiet : .hungUp
        }
    }

    public func shutdown() { _ = Glibc.shutdown(fileDescriptor, Int32(SHUT_RDWR)) }
}

/// A listening `AF_UNIX` socket at a path; removes the path on close.
public final class UnixListener: @unchecked Sendable {
    // @unchecked Sendable: an immutable descriptor and path.
    public let fileDescriptor: Int32
    public let path: String

    public init(path: String, backlog: Int32 = 4) throws(UnixChannel.Error) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .system(.current("socket")) }
        unlink(path)
        do throws(UnixChannel.Error) {
            try withSocketAddress(path) { (addr, len) throws(UnixChannel.Error) in
                guard bind(fd, addr, len) == 0 else { throw .system(.current("bind(\(path))")) }
            }
            guard listen(fd, backlog) == 0 else { throw UnixChannel.Error.system(.current("listen")) }
        } catch {
            closeDescriptor(fd)
            throw error
        }
        self.fileDescriptor = fd
        self.path = path
    }

    /// Accepts one connection, waiting at most until `deadline`.
    public func accept(until deadline: Deadline) throws(UnixChannel.Error) -> UnixChannel {
        while true {
            var pfd = pollfd(fd: fileDescriptor, events: Int16(POLLIN), revents: 0)
            let r = poll(&pfd, 1, deadline.pollTimeoutMilliseconds)
            if r == 0 { throw .timedOut }
            if r < 0 {
                if errno == EINTR { continue }
                throw .system(.current("poll"))
            }
            let fd = rf_accept_cloexec(fileDescriptor)
            if fd >= 0 { return UnixChannel(adopting: fd) }
            if errno == EINTR || errno == EAGAIN || errno == ECONNABORTED { continue }
            throw .system(.current("accept4"))
        }
    }

    deinit {
        closeDescriptor(fileDescriptor)
        unlink(path)
    }
}

private func withSocketAddress(
    _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws(UnixChannel.Error) -> Void
) throws(UnixChannel.Error) {
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    let capacity = MemoryLayout.size(ofValue: addr.sun_path)
    guard bytes.count < capacity else { throw .pathTooLong(path) }
    withUnsafeMutableBytes(of: &addr.sun_path) { raw in
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let len = socklen_t(MemoryLayout<sockaddr_un>.size)
    try withUnsafePointer(to: &addr) { (p) throws(UnixChannel.Error) in
        try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sp) throws(UnixChannel.Error) in
            try body(sp, len)
        }
    }
}
