#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory
public import Virtqueue

/// The setup message the driver process sends the device process, with three descriptors
/// (memfd, kick eventfd, call eventfd). Fixed little-endian layout; the device validates
/// every field (it does not trust the driver either).
public struct RingSetup: Sendable, Equatable {
    public static let magic: UInt32 = 0x5246_4e47  // "RFNG"
    public static let size = 56

    public var queueSize: UInt32
    public var eventIndex: Bool
    public var indirect: Bool
    public var regionSize: UInt64
    public var guestBase: UInt64
    public var descriptors: UInt64
    public var avail: UInt64
    public var used: UInt64

    public var encoded: [UInt8] {
        var b: [UInt8] = []
        func put<T: FixedWidthInteger>(_ v: T) {
            for i in 0..<MemoryLayout<T>.size { b.append(UInt8(truncatingIfNeeded: v >> (8 * i))) }
        }
        put(Self.magic)
        put(queueSize)
        put(UInt32((eventIndex ? 1 : 0) | (indirect ? 2 : 0)))
        put(UInt32(0))
        put(regionSize)
        put(guestBase)
        put(descriptors)
        put(avail)
        put(used)
        return b
    }

    public enum DecodeError: Error, Equatable { case badMagic, badFlags, badSize }

    public static func decode(_ b: [UInt8]) throws(DecodeError) -> RingSetup {
        guard b.count == size else { throw .badSize }
        func get<T: FixedWidthInteger>(_: T.Type, _ o: Int) -> T {
            var v: T = 0
            for i in 0..<MemoryLayout<T>.size { v |= T(truncatingIfNeeded: b[o + i]) << (8 * i) }
            return v
        }
        guard get(UInt32.self, 0) == magic else { throw .badMagic }
        let flags = get(UInt32.self, 8)
        guard flags & ~3 == 0 else { throw .badFlags }
        return RingSetup(
            queueSize: get(UInt32.self, 4), eventIndex: flags & 1 != 0, indirect: flags & 2 != 0,
            regionSize: get(UInt64.self, 16), guestBase: get(UInt64.self, 24),
            descriptors: get(UInt64.self, 32), avail: get(UInt64.self, 40), used: get(UInt64.self, 48))
    }
}

/// Figures from one two-process run.
public struct RingRunReport: Sendable {
    public var roundTrips: Int
    public var bytes: Int
    public var seconds: Double
    public var kicks: Int
    public var interrupts: Int
    public var checksumFailures: Int
    public var roundTripsPerSecond: Double { seconds > 0 ? Double(roundTrips) / seconds : 0 }
    public var mebibytesPerSecond: Double { seconds > 0 ? Double(bytes) / seconds / 1_048_576 : 0 }
}

public enum TwoProcessError: Error, CustomStringConvertible {
    case setup(String)
    case violation(Violation)
    case submit(SubmitError)
    case deviceStalled(afterRoundTrips: Int)
    case deviceExited(ChildProcess.Exit)
    case checksumMismatch(token: UInt64)

    public var description: String {
        switch self {
        case .setup(let s): return "setup failed: \(s)"
        case .violation(let v): return "device violated \(v)"
        case .submit(let e): return "submit failed: \(e)"
        case .deviceStalled(let n): return "device stopped answering after \(n) round trips"
        case .deviceExited(let e): return "device process \(e)"
        case .checksumMismatch(let t): return "payload of request \(t) came back corrupted"
        }
    }
}

/// A driver in this process and an `EchoDevice` in a spawned child, sharing one sealed
/// memfd and two eventfds passed over a Unix socket: the real cross-process path.
public final class TwoProcessRing {
    public let pair: (driver: DriverQueue, pool: BouncePool)
    let region: SharedRegion
    let kick: Notifier
    let call: Notifier
    let channel: UnixChannel
    let child: ChildProcess
    public var childPID: Int32 { child.pid }
    public let queueSize: Int

    /// Spawns `executable ring-device --fd 3` (the hidden `ringfence` subcommand).
    public init(
        executable: String = currentExecutablePath(), queueSize: Int = 256,
        features: RingFeatures = RingFeatures(eventIndex: true, indirectDescriptors: false),
        bounceBytes: Int = 4 << 20
    ) throws {
        let layout = DriverRegionLayout(
            queueCount: 1, queueSize: queueSize, indirectEntries: 0, bounceBytesPerQueue: bounceBytes)
        let guestBase: UInt64 = 0x1_0000_0000
        region = try SharedRegion(name: "ringfence-two-process", size: layout.totalSize)
        kick = try Notifier()
        call = try Notifier()
        let (mine, theirs) = try UnixChannel.pair()
        channel = mine
        child = try ChildProcess(
            executable: executable, arguments: ["ring-device", "--fd", "3"], passing: [theirs.fileDescriptor])
        self.queueSize = queueSize
        pair = layout.makeDriverQueue(queue: 0, region: region, guestBase: guestBase, features: features)
        let a = layout.ringAddresses(queue: 0, guestBase: guestBase)
        let setup = RingSetup(
            queueSize: UInt32(queueSize), eventIndex: features.eventIndex, indirect: features.indirectDescriptors,
            regionSize: UInt64(layout.totalSize), guestBase: guestBase, descriptors: a.descriptors,
            avail: a.avail, used: a.used)
        try channel.send(
            setup.encoded, descriptors: [region.fileDescriptor, kick.fileDescriptor, call.fileDescriptor])
    }

    /// Runs round trips for `seconds` (or `count`), `depth` requests in flight, payloads of
    /// `payloadSize` bytes, verifying every answer.
    public func run(
        seconds: Double, count: Int = .max, depth: Int = 32, payloadSize: Int = 64,
        progress: ((RingRunReport) -> Void)? = nil
    ) throws -> RingRunReport {
        let driver = pair.driver
        let pool = pair.pool
        let depth = max(1, min(depth, queueSize / 2))
        struct Slot {
            var out: BounceSlice
            var back: BounceSlice
            var sum: UInt64
        }
        var slots: [Slot] = []
        var payload = [UInt8](repeating: 0, count: payloadSize)
        for i in 0..<depth {
            guard let out = pool.allocate(payloadSize), let back = pool.allocate(payloadSize + EchoDevice.checksumSize)
            else { throw TwoProcessError.setup("bounce pool too small") }
            for k in 0..<payloadSize { payload[k] = UInt8(truncatingIfNeeded: k &* 7 &+ i) }
            payload.withUnsafeBytes { pool.copyIn(out, from: $0) }
            let sum = payload.withUnsafeBytes { fnv1a($0) }
            slots.append(Slot(out: out, back: back, sum: sum))
        }
        var report = RingRunReport(roundTrips: 0, bytes: 0, seconds: 0, kicks: 0, interrupts: 0, checksumFailures: 0)
        var answer = [UInt8](repeating: 0, count: payloadSize + EchoDevice.checksumSize)
        let start = monotonicNanoseconds()
        let end = start &+ UInt64(seconds * 1e9)
        var nextProgress = start &+ 1_000_000_000
        var posted = 0
        func post(_ i: Int) throws {
            do {
                try driver.add(
                    [
                        pool.segment(slots[i].out, deviceWritable: false),
                        pool.segment(slots[i].back, deviceWritable: true),
                    ],
                    token: UInt64(i))
            } catch { throw TwoProcessError.submit(error) }
            posted += 1
        }
        for i in 0..<min(depth, count) { try post(i) }
        if driver.publish() {
            kick.signal()
            report.kicks += 1
        }
        var stopping = false
        while report.roundTrips < posted {
            var progressed = false
            var spins = 0
            while true {
                let completion: Completion?
                do { completion = try driver.nextCompletion() } catch { throw TwoProcessError.violation(error) }
                guard let completion else { break }
                progressed = true
                let i = Int(completion.token)
                let got = answer.withUnsafeMutableBytes {
                    pool.copyOut(slots[i].back, validatedLength: Int(completion.length), to: $0)
                }
                var ok = got == payloadSize + EchoDevice.checksumSize
                if ok {
                    var sum: UInt64 = 0
                    for k in 0..<8 { sum |= UInt64(answer[payloadSize + k]) << (8 * UInt64(k)) }
                    ok = sum == slots[i].sum
                }
                if !ok { report.checksumFailures += 1 }
                report.roundTrips += 1
                report.bytes += payloadSize
                if !stopping && posted < count { try post(i) }
            }
            if progressed {
                if driver.publish() {
                    kick.signal()
                    report.kicks += 1
                }
                let now = monotonicNanoseconds()
                if now >= end { stopping = true }
                if let progress, now >= nextProgress {
                    report.seconds = Double(now - start) / 1e9
                    progress(report)
                    nextProgress = now &+ 1_000_000_000
                }
                continue
            }
            spins += 1
            // Nothing yet: re-arm the interrupt and sleep on it (bounded: R5).
            if driver.enableInterrupts() { continue }
            if call.wait(until: .after(seconds: 5)) == 0 {
                if driver.enableInterrupts() { continue }
                if let exit = child.wait(until: .now) { throw TwoProcessError.deviceExited(exit) }
                throw TwoProcessError.deviceStalled(afterRoundTrips: report.roundTrips)
            }
            report.interrupts += 1
        }
        report.seconds = Double(monotonicNanoseconds() - start) / 1e9
        for s in slots {
            pool.free(s.out)
            pool.free(s.back)
        }
        return report
    }

    /// Tells the device to stop and reaps it.
    public func finish() -> ChildProcess.Exit? {
        try? channel.send([0x51])  // 'Q'
        channel.shutdown()
        return child.wait(until: .after(seconds: 5)) ?? child.kill()
    }

    /// The device side: runs in the child until the driver says stop or goes away.
    public static func serveDevice(channelFD: Int32) throws -> Int {
        let channel = UnixChannel(adopting: channelFD)
        var header = [UInt8](repeating: 0, count: RingSetup.size)
        let fds = ReceivedDescriptors(
            try header.withUnsafeMutableBytes {
                try channel.receive(exactly: $0, maxDescriptors: 3, until: .after(seconds: 10))
            })
        guard fds.count == 3, let region = fds.take(0), let kickFD = fds.take(1), let callFD = fds.take(2) else {
            throw TwoProcessError.setup("expected 3 descriptors, got \(fds.count)")
        }
        let setup: RingSetup
        do { setup = try RingSetup.decode(header) } catch {
            throw TwoProcessError.setup("bad setup message: \(error)")
        }
        let kick = try Notifier(adopting: kickFD)
        let call = try Notifier(adopting: callFD)
        let mapping = try SharedRegion(mapping: region, offset: 0, size: setup.regionSize)
        let memory = try GuestMemory([
            GuestRegion(guestAddress: setup.guestBase, userAddress: setup.guestBase, mapping: mapping)
        ])
        let queue = try DeviceQueue(
            queueSize: Int(setup.queueSize), descriptorAddress: setup.descriptors,
            availAddress: setup.avail, usedAddress: setup.used,
            features: RingFeatures(eventIndex: setup.eventIndex, indirectDescriptors: setup.indirect),
            memory: memory)
        var device = EchoDevice()
        var total = 0
        var idleSpins = 0
        while true {
            let n = try device.serve(queue, memory: memory, budget: 64)
            if n > 0 {
                total += n
                idleSpins = 0
                if queue.publishUsed() { call.signal() }
                continue
            }
            idleSpins += 1
            if idleSpins < 200 { continue }  // brief spin, then block
            if queue.enableNotifications() { continue }
            var pfds = [
                pollfd(fd: kick.fileDescriptor, events: Int16(POLLIN), revents: 0),
                pollfd(fd: channel.fileDescriptor, events: Int16(POLLIN), revents: 0),
            ]
            let r = poll(&pfds, 2, 10_000)
            if r == 0 { return total }  // the driver went quiet: stop
            if pfds[1].revents != 0 { return total }  // stop byte or hang-up
            kick.drain()
            idleSpins = 0
        }
    }
}
