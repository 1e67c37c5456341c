#if canImport(Glibc)
import Glibc
#endif
import SharedMemory
import Virtqueue

/// One virtqueue of a `VirtioFSDriver` (hiprio or a request queue): posts one FUSE
/// request at a time and waits for its completion with a deadline (R5).
///
/// The request (header, arguments, data) is copied into a bounce slice (R7); the reply
/// area follows it in the same slice. On completion the used length (already checked by
/// the ring against what was posted) bounds one copy of the reply into private memory
/// (R2); every FUSE check runs on that copy. Not thread-safe: the driver holds the
/// queue's lock around `exchange`.
final class FSQueue {
    let index: Int
    let ring: any DriverRing
    let pool: BouncePool
    let kick: Notifier
    let call: Notifier
    let spinIterations: Int
    var backoff = WakeBackoff()
    /// Set once this queue broke: its last slice stays quarantined (the device may still
    /// write it), and nothing more is posted.
    var broken = false

    init(index: Int, ring: any DriverRing, pool: BouncePool, kick: Notifier, call: Notifier, spinIterations: Int) {
        self.index = index
        self.ring = ring
        self.pool = pool
        self.kick = kick
        self.call = call
        self.spinIterations = spinIterations
    }

    /// What came back: the used length and a private copy of that many reply bytes (with
    /// `dataDestination`: of the reply header only; the rest went to the destination).
    struct Reply {
        let usedLength: UInt32
        let bytes: [UInt8]
    }

    /// Posts `request` (+ `data`) with `replyCapacity` device-writable bytes after it (0:
    /// a request without reply) and waits until `deadline`. `control` is the vhost-user
    /// socket, watched for a hang-up while waiting. With `dataDestination` (READ into the
    /// caller's buffer), only the reply header is copied privately and the bytes after it
    /// (at most the used length minus the header, at most the destination) are copied
    /// once, straight into the destination: payload, never parsed.
    func exchange(
        request: [UInt8], data: UnsafeRawBufferPointer?, replyCapacity: Int, deadline: Deadline, control: Int32,
        timeoutMilliseconds: UInt64, dataDestination: UnsafeMutableRawBufferPointer? = nil
    ) throws(FSError) -> Reply {
        guard !broken else { throw .disconnected("queue \(index) is broken") }
        let dataCount = data?.count ?? 0
        let readable = request.count + dataCount
        guard let slice = pool.allocate(readable + replyCapacity) else {
            throw .invalidRequest("request of \(readable + replyCapacity) bytes does not fit the bounce pool")
        }
        request.withUnsafeBytes { pool.copyIn(slice, at: 0, from: $0) }
        if let data { pool.copyIn(slice, at: request.count, from: data) }
        var segments = [pool.segment(slice, offset: 0, length: readable, deviceWritable: false)]
        if replyCapacity > 0 {
            segments.append(pool.segment(slice, offset: readable, length: replyCapacity, deviceWritable: true))
        }
        do {
            try ring.add(segments, token: UInt64(index))
        } catch {
            pool.free(slice)
            switch error {
            case .broken(let v): throw .violation(v)
            default: throw .invalidRequest(error.description)
            }
        }
        if ring.publish() && !kick.signal() { return try breakQueue(.violation(.notifierBlocked(role: "kick"))) }
        var spins = 0
        var woken = false
        while true {
            let completion: Completion?
            do {
                completion = try ring.nextCompletion()
            } catch {
                broken = true
                throw .violation(error)
            }
            if let completion {
                backoff.note(productive: true)
                if let dataDestination {
                    let header = min(Int(completion.length), FuseProtocol.outHeaderSize)
                    var bytes = [UInt8](repeating: 0, count: header)
                    bytes.withUnsafeMutableBytes {
                        _ = pool.copyOut(slice, at: readable, validatedLength: header, to: $0)
                    }
                    if Int(completion.length) > header {
                        _ = pool.copyOut(
                            slice, at: readable + header, validatedLength: Int(completion.length) - header,
                            to: dataDestination)
                    }
                    pool.free(slice)
                    return Reply(usedLength: completion.length, bytes: bytes)
                }
                var bytes = [UInt8](repeating: 0, count: Int(completion.length))
                bytes.withUnsafeMutableBytes {
                    _ = pool.copyOut(slice, at: readable, validatedLength: Int(completion.length), to: $0)
                }
                pool.free(slice)
                return Reply(usedLength: completion.length, bytes: bytes)
            }
            if woken {
                // Woken without a completion: a storm is backed off (R5).
                woken = false
                backoff.note(productive: false)
                backoff.pause(until: deadline)
            }
            spins += 1
            if spins <= spinIterations { continue }
            if deadline.hasPassed { return try breakQueue(.timeout(milliseconds: timeoutMilliseconds)) }
            if ring.enableInterrupts() { continue }
            switch EventWaiter.wait(for: call, orReadable: control, until: deadline) {
            case .notified(let n):
                ring.disableInterrupts()
                woken = n > 0
                continue
            case .timedOut:
                continue
            case .other:
                switch UnixChannel.peerState(of: control) {
                case .quiet: continue
                case .spoke:
                    return try breakQueue(
                        .deviceViolation(.controlProtocol("unsolicited message on the vhost-user socket")))
                case .hungUp: return try breakQueue(.disconnected("back-end closed the vhost-user socket"))
                }
            }
        }
    }

    /// This queue fails closed (R6): the in-flight slice stays quarantined.
    func breakQueue(_ error: FSError) throws(FSError) -> Reply {
        broken = true
        if case .violation(let v) = error {
            ring.breakQueue(v)
        } else {
            ring.breakQueue(.brokenAbove(rule: error.rule ?? .r6, reason: error.description))
        }
        throw error
    }
}
