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
    /// Packed attacks that forge ring bytes do so once per handler (each time the ring starts).
    var forged = false
    /// `packed-used-slot-not-available`: forge after this serve's completions.
    var forgeAfterServe: UInt16?
    /// `packed-event-*`: the device-area snapshot to write before the next publish, then
    /// whether to wait for the driver's next request (keeping the worker from rewriting it).
    var eventGarbage: UInt32?
    var awaitDriver = false
    /// `packed-toctou-used-descriptor`: slots of used descriptors completed in this serve,
    /// and of those published by earlier ones (read by the driver once it posts again).
    var completedSlots: [UInt16] = []
    var publishedSlots: [UInt16] = []
    /// `kick-fd-blocking-saturated`: keep the worker (the kick fd's only reader) inside
    /// `serve` on its next call, so the counter stays full.
    var holdNextServe = false
    /// `call-fd-blocking-emptied`: the racing thread runs (once per handler).
    var eaterStarted = false

    init(device: AdversaryDevice, inner: BlockRequestHandler, queue: Int, behaviour: Behaviour?) {
        self.device = device
        self.inner = inner
        self.queueIndex = queue
        self.behaviour = behaviour
    }

    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int {
        device.remember(memory)
        guard let behaviour else { return try inner.serve(queue, memory: memory, budget: budget) }
        if rewritePending {
            rewriteAllUsedEntries(queue)
            rewritePending = false
        }
        if awaitDriver {
            awaitDriver = false
            waitForNextRequest(queue, memory)
        }
        if holdNextServe {
            holdNextServe = false
            serveWithoutReadingKicks(queue, memory, seconds: 5)
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
        if let id = forgeAfterServe {
            forgeAfterServe = nil
            forgeUsedInUnavailableSlot(queue, memory, id: id)
        }
        publishedSlots += completedSlots
        completedSlots.removeAll()
        releaseLate(queue)
        return count
    }

    /// `packed-event-*`: the garbage goes in before the completion becomes visible, so the
    /// driver's next publish (which needs that completion first) is sure to read it.
    func beforePublish(_ queue: any DeviceRing, memory: GuestMemory) {
        guard let garbage = eventGarbage, let area = packedPart(\.used, length: 4, memory) else { return }
        eventGarbage = nil
        SharedAccess.store32(area, garbage)
        awaitDriver = true
    }

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
        case .payloadLie(let lie)?:
            return payloadEligible(lie, chain)
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
        case .payloadLie(let lie):
            payloadLie(lie, queue)
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
            // Once per connection: the storm is one burst of calls, not one per request.
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
        case .packed(let lie):
            attackPacked(lie, queue, memory)
        case .callFDBlockingSaturated:
            // Once: the counter full on a blocking descriptor, and this request never done.
            if let fd = device.callFD(queueIndex), device.observations.attacked == 1 {
                saturateBlocking(fd, "call")
            }
        case .kickFDBlockingSaturated:
            if let fd = device.kickFD(queueIndex), device.observations.attacked == 1 {
                saturateBlocking(fd, "kick")
                holdNextServe = true
            }
            queue.complete(head: head, length: inner.execute(chain))
        case .callFDBlockingEmptied:
            if !eaterStarted, let fd = device.callFD(queueIndex) {
                eaterStarted = true
                startEater(fd)
            }
            queue.complete(head: head, length: inner.execute(chain))
        case .config, .reply, .withoutVersion1, .unofferedFeatures, .ignoreKicks, .resizeMemfd, .mapBeyondRegion,
            .requestsNeverRead, .repliesJustInTime:
            queue.complete(head: head, length: inner.execute(chain))
        }
    }

    // MARK: shared descriptors

    /// Clears O_NONBLOCK on the shared open file description and fills the counter: the
    /// driver's next write of 1 to it blocks (unless it does not depend on the flag).
    func saturateBlocking(_ fd: Int32, _ role: String) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK)
        _ = Notifier.drain(descriptor: fd)
        var full: UInt64 = 0xFFFF_FFFF_FFFF_FFFE
        let n = write(fd, &full, 8)
        device.note("\(role) eventfd made blocking and saturated (write: \(n))")
    }

    /// `kick-fd-blocking-saturated`: keeps the worker (the kick fd's only reader) here for
    /// `seconds`, serving and publishing requests itself and asking for a kick after each,
    /// so the saturated counter is never drained and the driver's next kick blocks.
    func serveWithoutReadingKicks(_ queue: any DeviceRing, _ memory: GuestMemory, seconds: Double) {
        let connection = device.currentConnection
        let end = monotonicNanoseconds() &+ UInt64(seconds * 1e9)
        while monotonicNanoseconds() < end && !device.isReleased && device.currentConnection == connection {
            if queue.enableNotifications() {
                queue.disableNotifications()
                guard case .ready? = try? queue.nextChain(into: &chain, memory: memory) else { continue }
                _ = device.takeRequest()
                queue.complete(head: chain.head, length: inner.execute(chain))
                if queue.publishUsed() { signalDriver() }
                continue
            }
            usleep(200)
        }
        queue.disableNotifications()
    }

    /// Clears O_NONBLOCK on the call eventfd and drains every notification as soon as it
    /// is signalled: a driver that reads after poll finds it empty (and blocks, if it
    /// relies on O_NONBLOCK). Ends with the connection.
    func startEater(_ fd: Int32) {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK)
        let mine = dup(fd)
        let device = self.device
        let connection = device.currentConnection
        device.note("call eventfd made blocking; a thread empties it as soon as it is signalled")
        Thread.detachNewThread {
            defer { close(mine) }
            var eaten: UInt64 = 0
            while !device.isReleased && device.currentConnection == connection {
                var pfd = pollfd(fd: mine, events: Int16(POLLIN), revents: 0)
                // Wait a moment after it became readable: a driver's poll has woken by then,
                // and its read comes next (the window a flag-dependent read blocks in).
                guard poll(&pfd, 1, 50) == 1 else { continue }
                usleep(UInt32.random(in: 0...50))
                if Notifier.drain(descriptor: mine) > 0 { eaten &+= 1 }
            }
            device.note("emptied the call eventfd \(eaten) times")
        }
    }

    // MARK: packed ring

    /// The packed attacks: the chain was popped and validated by the real
    /// `PackedDeviceQueue` and executed by the real blk device; what the completion says is
    /// the lie. Raw ring bytes are written at the ring the driver announced (SET_VRING_ADDR),
    /// as the split vandalism attacks do.
    func attackPacked(_ lie: Behaviour.PackedLie, _ queue: any DeviceRing, _ memory: GuestMemory) {
        let head = chain.head
        let size = Int(queue.queueSize)
        guard let packed = queue as? PackedDeviceQueue else {
            // Unreachable: a packed attack gets this handler only on a packed ring.
            queue.complete(head: head, length: inner.execute(chain))
            return
        }
        switch lie {
        case .wrongWrapCounter:
            // Once forged, later chains are held: a real completion in that slot would mend it.
            guard !forged else { return }
            forged = true
            let length = inner.execute(chain)
            let flags = PackedLayout.usedMarker(wrap: !packed.usedWrap) | (length > 0 ? PackedLayout.flagWrite : 0)
            writeUsed(slot: packed.usedIndex, id: head, length: length, flags: flags, size: size, memory)
            signalDriver()
        case .idNeverPosted:
            // Our driver hands out ids from 0 upwards; the top id is in flight only when
            // the ring is full of one-slot requests.
            queue.complete(head: UInt16(truncatingIfNeeded: size - 1), length: inner.execute(chain))
        case .duplicateID:
            let length = inner.execute(chain)
            guard !forged else {
                queue.complete(head: head, length: length)
                return
            }
            forged = true
            // Pop what else is available first: once the duplicate is written, the slot
            // after this chain carries a used mark and the device could not read past it.
            var done = [(head: head, length: length)]
            var other = DescriptorChain()
            pop: while done.count < size {
                switch try? queue.nextChain(into: &other, memory: memory) {
                case .ready?:
                    _ = device.takeRequest()
                    done.append((other.head, inner.execute(other)))
                case .rejected(let h, _)?:
                    done.append((h, 0))
                case .empty?, nil:
                    break pop
                }
            }
            queue.complete(head: head, length: length)
            queue.complete(head: head, length: length)
            for d in done.dropFirst() { queue.complete(head: d.head, length: d.length) }
        case .usedSlotNotAvailable:
            queue.complete(head: head, length: inner.execute(chain))
            if !forged {
                forged = true
                forgeAfterServe = head
            }
        case .eventSuppression(let kind):
            queue.complete(head: head, length: inner.execute(chain))
            guard !forged else { return }
            forged = true
            switch kind {
            case .reservedFlags:
                eventGarbage = UInt32(3) << 16
            case .offsetBeyondRing:
                // One past the last slot (a 32768-slot ring has no offset beyond it: 0x7fff).
                let offset = UInt32(min(size, 0x7fff))
                eventGarbage =
                    UInt32(PackedLayout.eventFlagDescriptor) << 16 | UInt32(PackedLayout.eventWrapBit) | offset
            }
        case .rewriteAfterRead:
            // This chain was posted after the driver took the earlier completions (our
            // probe waits for each before it posts again): rewrite those now.
            rewritePublished(size: size, memory)
            completedSlots.append(packed.usedIndex)
            queue.complete(head: head, length: inner.execute(chain))
        }
    }

    /// `packed-used-slot-not-available`: a used mark of the current lap in the slot after
    /// the last completion, which the driver has not made available.
    func forgeUsedInUnavailableSlot(_ queue: any DeviceRing, _ memory: GuestMemory, id: UInt16) {
        guard let packed = queue as? PackedDeviceQueue else { return }
        let flags = PackedLayout.usedMarker(wrap: packed.usedWrap) | PackedLayout.flagWrite
        writeUsed(slot: packed.usedIndex, id: id, length: 1, flags: flags, size: Int(queue.queueSize), memory)
        device.note("forged a used descriptor in slot \(packed.usedIndex), which the driver had not made available")
    }

    func rewritePublished(size: Int, _ memory: GuestMemory) {
        guard !publishedSlots.isEmpty,
            let ring = packedPart(\.descriptor, length: PackedLayout.ringSize(size), memory)
        else { return }
        for slot in publishedSlots where Int(slot) < size {
            let d = ring + Int(slot) * PackedLayout.descriptorSize
            SharedAccess.store32(d + PackedLayout.descLen, 0xffff_ffff)
            SharedAccess.store16(d + PackedLayout.descID, 0xdead)
        }
        let n = publishedSlots.count
        device.state.withLock { $0.observations.rewrittenDescriptors += n }
        publishedSlots.removeAll()
    }

    /// A used descriptor written by hand: len and id, then the flags (release).
    func writeUsed(slot: UInt16, id: UInt16, length: UInt32, flags: UInt16, size: Int, _ memory: GuestMemory) {
        guard Int(slot) < size, let ring = packedPart(\.descriptor, length: PackedLayout.ringSize(size), memory) else {
            return
        }
        let d = ring + Int(slot) * PackedLayout.descriptorSize
        SharedAccess.store32(d + PackedLayout.descLen, length)
        SharedAccess.store16(d + PackedLayout.descID, id)
        SharedAccess.store16Release(d + PackedLayout.descFlags, flags)
    }

    /// A part of this queue's packed ring as announced (descriptor ring = `descriptor`,
    /// driver area = `avail`, device area = `used`), translated like any driver address.
    func packedPart(_ part: KeyPath<VringAddress, UInt64>, length: Int, _ memory: GuestMemory)
        -> UnsafeMutableRawPointer?
    {
        guard let a = device.ring(queueIndex) else { return nil }
        return (try? memory.translateUser(a[keyPath: part], length: UInt64(length)))?.baseAddress
    }

    /// An interrupt for a forgery that `publishUsed` does not know about.
    func signalDriver() {
        guard let fd = device.callFD(queueIndex) else { return }
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    /// `packed-event-*`: stays inside `serve` (where the worker never touches the device
    /// area) until the driver's next request is available, for at most 500 ms.
    func waitForNextRequest(_ queue: any DeviceRing, _ memory: GuestMemory) {
        guard let packed = queue as? PackedDeviceQueue,
            let ring = packedPart(\.descriptor, length: PackedLayout.ringSize(Int(queue.queueSize)), memory)
        else { return }
        let flags = ring + Int(packed.nextAvail) * PackedLayout.descriptorSize + PackedLayout.descFlags
        let wanted = PackedLayout.availableMarker(wrap: packed.availWrap)
        let end = monotonicNanoseconds() &+ 500_000_000
        while monotonicNanoseconds() < end {
            if SharedAccess.load16Acquire(flags) & (PackedLayout.flagAvail | PackedLayout.flagUsed) == wanted { return }
            usleep(50)
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
