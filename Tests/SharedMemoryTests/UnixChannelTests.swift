import CRingFence
import Glibc
import RingTestSupport
import SharedMemory
import Testing

/// Written by one thread before it ends, read by another after joining it.
final class OutcomeBox: @unchecked Sendable {
    var ok = false
}

/// The control channel: descriptors arrive close-on-exec, surplus ones are closed (no fd
/// leak a peer can grow), a closed peer is `.closed` (never SIGPIPE), and every receive
/// has a deadline (R5).
@Suite struct UnixChannelTests {
    static func identity(_ fd: Int32) -> (UInt64, UInt64)? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return (UInt64(st.st_dev), UInt64(st.st_ino))
    }

    static func receive(_ c: UnixChannel, bytes: Int, maxDescriptors: Int, seconds: Double = 5)
        throws(UnixChannel.Error) -> ([UInt8], [Int32])
    {
        var buffer = [UInt8](repeating: 0, count: bytes)
        let result = buffer.withUnsafeMutableBytes { p in
            Result { () throws(UnixChannel.Error) in
                try c.receive(exactly: p, maxDescriptors: maxDescriptors, until: .after(seconds: seconds))
            }
        }
        return (buffer, try result.get())
    }

    /// A pipe whose read end tells us when every copy of the write end is closed.
    static func pipePair() -> (read: Int32, write: Int32) {
        var p: [Int32] = [-1, -1]
        #expect(pipe(&p) == 0)
        _ = fcntl(p[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(p[1], F_SETFD, FD_CLOEXEC)
        return (p[0], p[1])
    }

    static func allWritersClosed(_ readEnd: Int32, within ms: Int32) -> Bool {
        var pfd = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
        return poll(&pfd, 1, ms) == 1 && pfd.revents & Int16(POLLHUP) != 0
    }

    @Test func passedDescriptorsArriveCloseOnExec() throws {
        let (a, b) = try UnixChannel.pair()
        let notifier = try Notifier()
        let region = try SharedRegion(name: "pass", size: 4096)
        try a.send([1, 2, 3, 4, 5], descriptors: [notifier.fileDescriptor, region.fileDescriptor])
        let (bytes, fds) = try Self.receive(b, bytes: 5, maxDescriptors: 4)
        #expect(bytes == [1, 2, 3, 4, 5])
        #expect(fds.count == 2)
        defer { for fd in fds { close(fd) } }
        guard fds.count == 2 else { return }
        for fd in fds { #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0) }
        #expect(Self.identity(fds[0])! == Self.identity(notifier.fileDescriptor)!)
        #expect(Self.identity(fds[1])! == Self.identity(region.fileDescriptor)!)
        // The received eventfd is the same doorbell.
        var one: UInt64 = 1
        #expect(write(fds[0], &one, 8) == 8)
        #expect(notifier.drain() == 1)
    }

    @Test(arguments: [-1, 0, 1, 2])
    func surplusDescriptorsAreClosed(accepted: Int) throws {
        let (a, b) = try UnixChannel.pair()
        let keep = try Notifier()
        let (r, w) = Self.pipePair()
        defer { close(r) }
        // The first descriptor may be accepted; every copy of the pipe's write end beyond
        // `accepted` is surplus and must be closed by the receiver.
        try a.send([9], descriptors: [keep.fileDescriptor, w, w, w])
        close(w)
        let (_, fds) = try Self.receive(b, bytes: 1, maxDescriptors: accepted)
        #expect(fds.count == max(0, accepted))
        if accepted >= 1 { #expect(Self.identity(fds[0])! == Self.identity(keep.fileDescriptor)!) }
        // Our write end is closed; the surplus copies must be too (the accepted ones we close).
        for fd in fds.dropFirst() { close(fd) }
        #expect(Self.allWritersClosed(r, within: 2000))
        if let first = fds.first { close(first) }
    }

    /// sendmsg with one byte and `fds` in a single SCM_RIGHTS message, built by hand so a
    /// test can exceed what `UnixChannel.send` allows (a peer is not bound by our limits).
    static func rawSend(_ sock: Int32, descriptors fds: [Int32]) -> Int {
        let header = MemoryLayout<cmsghdr>.size
        let length = header + 4 * fds.count
        var control = [UInt8](repeating: 0, count: (length + 7) & ~7)
        control.withUnsafeMutableBytes { p in
            p.storeBytes(of: length, toByteOffset: 0, as: Int.self)  // cmsg_len (size_t)
            p.storeBytes(of: Int32(SOL_SOCKET), toByteOffset: 8, as: Int32.self)
            p.storeBytes(of: Int32(1), toByteOffset: 12, as: Int32.self)  // SCM_RIGHTS
            for (i, fd) in fds.enumerated() { p.storeBytes(of: fd, toByteOffset: header + 4 * i, as: Int32.self) }
        }
        var byte: UInt8 = 0x42
        return withUnsafeMutablePointer(to: &byte) { b in
            var iov = iovec(iov_base: b, iov_len: 1)
            return withUnsafeMutablePointer(to: &iov) { iovp in
                control.withUnsafeMutableBytes { c in
                    var msg = msghdr()
                    msg.msg_iov = iovp
                    msg.msg_iovlen = 1
                    msg.msg_control = c.baseAddress
                    msg.msg_controllen = c.count
                    return sendmsg(sock, &msg, Int32(MSG_NOSIGNAL))
                }
            }
        }
    }

    @Test(arguments: [0, 4, 16])
    func descriptorFloodIsControlTruncatedAndLeaksNothing(accepted: Int) throws {
        // 40 descriptors in one message: more than the 16 we ever take. The kernel cuts the
        // control data (MSG_CTRUNC); the receive fails and every copy is closed.
        let (a, b) = try UnixChannel.pair()
        let (r, w) = Self.pipePair()
        defer { close(r) }
        #expect(Self.rawSend(a.fileDescriptor, descriptors: [Int32](repeating: w, count: 40)) == 1)
        close(w)
        #expect(throws: UnixChannel.Error.controlTruncated) { try Self.receive(b, bytes: 1, maxDescriptors: accepted) }
        #expect(Self.allWritersClosed(r, within: 2000))
    }

    @Test func peerCloseIsClosedNotAHang() throws {
        var (a, b): (UnixChannel?, UnixChannel) = try UnixChannel.pair()
        a = nil  // the peer goes away
        _ = a
        let start = monotonicNanoseconds()
        #expect(throws: UnixChannel.Error.closed) { try Self.receive(b, bytes: 4, maxDescriptors: 0) }
        #expect(monotonicNanoseconds() - start < 1_000_000_000)
    }

    @Test func peerClosingMidMessageIsClosed() throws {
        var (a, b): (UnixChannel?, UnixChannel) = try UnixChannel.pair()
        try a?.send([1, 2])
        a = nil
        _ = a
        #expect(throws: UnixChannel.Error.closed) { try Self.receive(b, bytes: 4, maxDescriptors: 0) }
    }

    @Test func peerClosingMidMessageClosesDescriptorsAlreadyReceived() throws {
        // A partial message with descriptors, then EOF: the receive fails and must not leak them.
        var (a, b): (UnixChannel?, UnixChannel) = try UnixChannel.pair()
        let (r, w) = Self.pipePair()
        defer { close(r) }
        try a?.send([1, 2], descriptors: [w])
        close(w)
        a = nil
        _ = a
        #expect(throws: UnixChannel.Error.closed) { try Self.receive(b, bytes: 4, maxDescriptors: 4) }
        #expect(Self.allWritersClosed(r, within: 2000))
    }

    @Test func receiveDeadlineTimesOutWithinBound() throws {
        let (a, b) = try UnixChannel.pair()
        let start = monotonicNanoseconds()
        #expect(throws: UnixChannel.Error.timedOut) { try Self.receive(b, bytes: 4, maxDescriptors: 0, seconds: 0.05) }
        let elapsed = monotonicNanoseconds() - start
        #expect(elapsed >= 45_000_000 && elapsed < 2_000_000_000)
        // A peer that sends half a message and stalls also times out.
        try a.send([1, 2])
        #expect(throws: UnixChannel.Error.timedOut) { try Self.receive(b, bytes: 4, maxDescriptors: 0, seconds: 0.05) }
    }

    @Test func sendToClosedPeerIsClosedNotSIGPIPE() throws {
        // With SIGPIPE at its default action a send without MSG_NOSIGNAL kills the process,
        // so this test cannot pass by accident if the runner happens to ignore SIGPIPE.
        let previous = signal(SIGPIPE, SIG_DFL)
        defer { signal(SIGPIPE, previous) }
        var (a, b): (UnixChannel, UnixChannel?) = try UnixChannel.pair()
        b = nil
        _ = b
        #expect(throws: UnixChannel.Error.closed) { try a.send([1, 2, 3]) }
        #expect(throws: UnixChannel.Error.closed) { try a.send([1], descriptors: [a.fileDescriptor]) }
        let big = [UInt8](repeating: 7, count: 1 << 20)
        #expect(throws: UnixChannel.Error.closed) { try a.send(big) }
        _ = a
    }

    @Test func sendingDescriptorsWithoutBytesIsRefused() throws {
        // A stream socket carries ancillary data only with at least one byte: the kernel
        // accepts a zero-byte sendmsg and silently drops the descriptors.
        let (a, b) = try UnixChannel.pair()
        let n = try Notifier()
        #expect(throws: UnixChannel.Error.system(SystemError("sendmsg", errno: .invalidArgument))) {
            try a.send([], descriptors: [n.fileDescriptor])
        }
        try a.send([])  // nothing to send is fine
        #expect(throws: UnixChannel.Error.timedOut) { try Self.receive(b, bytes: 1, maxDescriptors: 1, seconds: 0.02) }
    }

    @Test func sendToAPeerThatNeverReadsTimesOut() throws {
        // R5: a device that stops reading fills the socket buffer; the driver's send must
        // give up at its deadline instead of blocking forever.
        let (a, b) = try UnixChannel.pair()
        let big = [UInt8](repeating: 1, count: 16 << 20)
        let start = monotonicNanoseconds()
        #expect(throws: UnixChannel.Error.timedOut) { try a.send(big, until: .after(seconds: 0.1)) }
        let elapsed = monotonicNanoseconds() - start
        #expect(elapsed >= 90_000_000 && elapsed < 3_000_000_000)
        withExtendedLifetime(b) {}  // the peer is alive, it just does not read
    }

    @Test func largeSendCompletesWhileThePeerReads() throws {
        let (a, b) = try UnixChannel.pair()
        let size = 4 << 20
        let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        let n = try Notifier()
        let result = OutcomeBox()
        let reader = TestThread {
            if let (bytes, fds) = try? Self.receive(b, bytes: size, maxDescriptors: 1, seconds: 20) {
                result.ok = bytes == payload && fds.count == 1
                for fd in fds { close(fd) }
            }
        }
        try a.send(payload, descriptors: [n.fileDescriptor], until: .after(seconds: 20))
        reader.join()  // bounded: the reader's receive has a 20 s deadline
        #expect(result.ok)
    }

    @Test func listenerAcceptHasADeadline() throws {
        let path = "/tmp/rf-test-\(getpid())-\(monotonicNanoseconds() % 1_000_000).sock"
        let listener = try UnixListener(path: path)
        #expect(throws: UnixChannel.Error.timedOut) { try listener.accept(until: .after(seconds: 0.05)) }
        let client = try UnixChannel.connect(path: path)
        let server = try listener.accept(until: .after(seconds: 5))
        try client.send([42])
        #expect(try Self.receive(server, bytes: 1, maxDescriptors: 0).0 == [42])
        #expect(fcntl(server.fileDescriptor, F_GETFD) & FD_CLOEXEC != 0)
    }

    @Test func overlongSocketPathIsRefused() {
        let path = "/tmp/" + String(repeating: "x", count: 200)
        #expect(throws: UnixChannel.Error.pathTooLong(path)) { try UnixChannel.connect(path: path) }
        #expect(throws: UnixChannel.Error.pathTooLong(path)) { try UnixListener(path: path) }
    }
}
