#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SharedMemory
import VhostUser
import VirtioBlock
import Virtqueue

/// Serves one queue the way the real blk device does (`BlockRequestHandler.execute`), but
/// decides itself when, how and whether each chain is completed: the attack's hook.
final class AdversaryQueueHandler: QueueHandler {
    let device: AdversaryDevice
    let inner: BlockRequestHandler
    let queueIndex: Int
    /// nil: no attack (a healthy device that still lets the probe see its memory).
    let behaviour: Behaviour?
    var chain = DescriptorChain()
    /// Popped and executed, completed later (or never).
    var held: [(head: UInt16, length: UInt32, since: UInt64)] = []
    var rewritePending = false

    init(device: AdversaryDevice, inner: BlockRequestHandler, queue: Int) {
        self.device = device
        self.inner = inner
        self.queueIndex = queue
        self.behaviour = device.attack?.behaviour
    }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        device.remember(memory)
        guard let behaviour else { return try inner.serve(queue, memory: memory, budget: budget) }
        if rewritePending {
            rewriteAllUsedEntries(queue)
            rewritePending = false
        }
        if case .ignoreKicks = behaviour, device.observations.requests >= device.after { return 0 }
        var count = 0
        fetch: while count < budget {
            switch try queue.nextChain(into: &chain, memory: memory) {
            case .empty:
                break fetch
            case .rejected(let head, _):
                queue.complete(head: head, length: 0)
            case .ready:
                if case .ignoreKicks = behaviour {
                    _ = device.takeRequest()
                    queue.complete(head: chain.head, length: inner.execute(chain))
                } else if device.takeRequest() && eligible(chain) {
                    attack(behaviour, queue, memory)
                } else {
                    queue.complete(head: chain.head, length: inner.execute(chain))
                }
            }
            count += 1
        }
        releaseLate(queue)
        return count
    }

    func beforePublish(_ queue: any DeviceRing, memory: GuestMemory) {}

    func idle(_ queue: any DeviceRing, memory: GuestMemory) {
        device.remember(memory)
        releaseLate(queue)
        if case .leakProbe = behaviour { device.dumpIfDue() }
    }

    /// Some attacks only make sense on some requests (a short read needs a read).
    func eligible(_ chain: DescriptorChain) -> Bool {
        let type = requestType(chain)
        switch behaviour {
        case .usedLength(.statusOnly), .rewriteFromThread(.data):
            return type == BlockProtocol.RequestType.read.rawValue && chain.writableLength > 1
        case .identifierWithoutNul:
            return type == BlockProtocol.RequestType.getID.rawValue
        default:
            return true
        }
    }

    /// The request type, read from the header in shared memory (the adversary reads freely).
    func requestType(_ chain: DescriptorChain) -> UInt32 {
        var bytes: [UInt8] = []
        for s in chain.readable where bytes.count < 4 {
            bytes += UnsafeRawBufferPointer(s.buffer).prefix(4 - bytes.count)
        }
        guard bytes.count == 4 else { return .max }
        return UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
    }

    var statusSegment: UnsafeMutableRawBufferPointer? {
        guard let last = chain.writable.last, last.buffer.count > 0 else { return nil }
        return UnsafeMutableRawBufferPointer(rebasing: last.buffer[(last.buffer.count - 1)...])
    }

    func attack(_ behaviour: Behaviour, _ queue: any DeviceRing, _ memory: GuestMemory) {
        let head = chain.head
        let size = Int(queue.queueSize)
        switch behaviour {
        case .usedIdOutOfRange:
            queue.complete(head: UInt16(truncatingIfNeeded: size + 7), length: inner.execute(chain))
        case .usedIdNotInFlight:
            let other = UInt16(truncatingIfNeeded: (Int(head) + 1) % size)
            queue.complete(head: other, length: inner.execute(chain))
        case .duplicateCompletion:
            let length = inner.execute(chain)
            queue.complete(head: head, length: length)
            queue.complete(head: head, length: length)
        case .usedIndexJump:
            let length = inner.execute(chain)
            for _ in 0...size { queue.complete(head: head, length: length) }
        case .usedIndexBackwards:
            // The private index wraps all the way round to one behind the last publish.
            let length = inner.execute(chain)
            for _ in 0..<Int(UInt16.max) { queue.complete(head: head, length: length) }
        case .usedLength(let lie):
            let length = inner.execute(chain)
            switch lie {
            case .overflow: queue.complete(head: head, length: length &+ 4096)
            case .zero: queue.complete(head: head, length: 0)
            case .statusOnly: queue.complete(head: head, length: 1)
            }
        case .status(let value):
            let length = inner.execute(chain)
            if let s = statusSegment { s[0] = value }
            queue.complete(head: head, length: length)
        case .statusNotWritten:
            let before = statusSegment?[0]
            let length = inner.execute(chain)
            if let s = statusSegment, let before { s[0] = before }
            queue.complete(head: head, length: length)
        case .identifierWithoutNul:
            // 20 bytes of 'A' (no NUL) across the writable segments, the status byte aside.
            var left = BlockProtocol.idSize
            let segments = Array(chain.writable)
            for (k, s) in segments.enumerated() where left > 0 {
                let n = min(left, max(0, s.buffer.count - (k == segments.count - 1 ? 1 : 0)))
                for i in 0..<n { s.buffer[i] = 0x41 }
                left -= n
            }
            if let s = statusSegment { s[0] = BlockProtocol.Status.ok.rawValue }
            queue.complete(head: head, length: UInt32(BlockProtocol.idSize + 1))
        case .rewriteUsedAfterPublish:
            queue.complete(head: head, length: inner.execute(chain))
            rewritePending = true
        case .rewriteFromThread(let target):
            let length = inner.execute(chain)
            var ranges: [UnsafeMutableRawBufferPointer] = []
            switch target {
            case .status: if let s = statusSegment { ranges.append(s) }
            case .data: ranges = chain.writable.map(\.buffer)
            }
            queue.complete(head: head, length: length)
            race(ranges.map { RaceTarget(memory: memory, bytes: $0) })
        case .scribbleDescriptors:
            if let a = device.ring(queueIndex),
                let table = try? memory.translateUser(a.descriptor, length: UInt64(16 * size))
            {
                for i in 0..<table.count { table[i] = 0xff }
            }
            queue.complete(head: head, length: inner.execute(chain))
        case .scribbleAvail:
            // A split-ring attack: the packed ring has no avail ring to scribble on.
            if let split = queue as? DeviceQueue, let a = device.ring(queueIndex),
                let ring = try? memory.translateUser(a.avail, length: UInt64(4 + 2 * size))
            {
                let slot = 4 + 2 * Int((split.lastAvail &- 1) & UInt16(truncatingIfNeeded: size - 1))
                ring[slot] = 0xff
                ring[slot + 1] = 0xff
            }
            queue.complete(head: head, length: inner.execute(chain))
        case .scribbleBounce:
            let length = inner.execute(chain)
            if let first = chain.segments.first, first.guestAddress >= 256,
                let before = try? memory.translate(first.guestAddress - 256, length: 256)
            {
                for i in 0..<before.count { before[i] = 0xa5 }
            }
            if let last = chain.segments.last,
                let after = try? memory.translate(last.guestAddress &+ UInt64(last.buffer.count), length: 256)
            {
                for i in 0..<after.count { after[i] = 0x5a }
            }
            queue.complete(head: head, length: length)
        case .neverComplete:
            break
        case .completeLate:
            held.append((head, inner.execute(chain), monotonicNanoseconds()))
        case .closeMidIO:
            device.closeConnection()
        case .notificationStorm(let calls):
            // Once per connection: the storm is 10^6 calls, not 10^6 per request.
            if let fd = device.callFD(queueIndex), device.observations.notificationsSent == 0 {
                var one: UInt64 = 1
                var sent = 0
                for _ in 0..<calls where write(fd, &one, 8) == 8 { sent += 1 }
                device.state.withLock { $0.observations.notificationsSent += sent }
            }
            queue.complete(head: head, length: inner.execute(chain))
        case .leakProbe:
            queue.complete(head: head, length: inner.execute(chain))
            device.dumpIfDue()
        case .config, .reply, .withoutVersion1, .unofferedFeatures, .ignoreKicks, .resizeMemfd, .mapBeyondRegion:
            queue.complete(head: head, length: inner.execute(chain))
        }
    }

    /// `complete-after-deadline`: completes held requests once they are old enough.
    func releaseLate(_ queue: any DeviceRing) {
        guard case .completeLate(let seconds) = behaviour, !held.isEmpty else { return }
        let now = monotonicNanoseconds()
        let limit = UInt64(seconds * 1e9)
        while let first = held.first, now &- first.since >= limit {
            queue.complete(head: first.head, length: first.length)
            held.removeFirst()
        }
    }

    /// Completing 2^16 entries walks the private used index once round the ring: every
    /// used entry (published ones too) now reads (0xdead, 0xffffffff), and the index is
    /// back where it was, so nothing new is published.
    func rewriteAllUsedEntries(_ queue: any DeviceRing) {
        for _ in 0..<65536 { queue.complete(head: 0xdead, length: 0xffff_ffff) }
    }

    /// A thread that rewrites `targets` for 20 ms (it races the driver's reads).
    func race(_ targets: [RaceTarget]) {
        guard !targets.isEmpty else { return }
        Thread.detachNewThread {
            let end = monotonicNanoseconds() &+ 20_000_000
            var v: UInt8 = 0x7f
            while monotonicNanoseconds() < end {
                for t in targets { for i in 0..<t.bytes.count { t.bytes[i] = v } }
                v = v == 0x7f ? 0x80 : 0x7f
            }
        }
    }
}
