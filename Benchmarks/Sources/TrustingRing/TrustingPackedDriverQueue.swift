import SharedMemory
import Virtqueue

/// BASELINE ONLY — never use outside the benchmarks (docs/design.md R8). A deliberately
/// trusting packed-ring driver in the style of Linux's `virtio_ring.c` packed path before
/// the 2021 hardening:
///
/// - a completion is recognised by the used bit alone (`avail == used == wrap`): no check
///   of the other states a slot may hold, nothing detects a forged mark (breaks R3);
/// - `id` and `len` are used as the device wrote them: no range, in-flight or length
///   check; a hostile id indexes private memory;
/// - the slot count to advance by is `desc_state[id].num` for that unchecked id (Linux
///   kept it privately from the start; nothing guards the index).
///
/// Everything else matches `PackedDriverQueue`: same ring memory, same `SharedAccess`
/// primitives and orderings, same batching (the first head's flags written at publish,
/// full fence, the device area read as one 32-bit snapshot). No indirect, no EVENT_IDX.
public final class TrustingPackedDriverQueue {
    struct State {
        var nextAvail: UInt16 = 0
        var availWrap = true
        var lastUsed: UInt16 = 0
        var usedWrap = true
        var freeSlots = 0
        var freeIDHead: UInt16 = 0
        var pendingSlot: UInt16 = 0
        var pendingFlags: UInt16 = 0
        var hasPending = false
    }

    public let memory: DriverRingMemory
    public let queueSize: UInt16
    let size: Int
    let tokens: UnsafeMutablePointer<UInt64>
    let nextFree: UnsafeMutablePointer<UInt16>
    let chainSlots: UnsafeMutablePointer<UInt16>
    let state: UnsafeMutablePointer<State>

    public init(memory: DriverRingMemory) {
        self.memory = memory
        self.queueSize = memory.queueSize
        size = Int(memory.queueSize)
        tokens = .allocate(capacity: size)
        tokens.initialize(repeating: 0, count: size)
        nextFree = .allocate(capacity: size)
        for i in 0..<size { (nextFree + i).initialize(to: UInt16(truncatingIfNeeded: i + 1)) }
        chainSlots = .allocate(capacity: size)
        chainSlots.initialize(repeating: 0, count: size)
        state = .allocate(capacity: 1)
        state.initialize(to: State(freeSlots: size))
    }

    deinit {
        tokens.deallocate()
        nextFree.deallocate()
        chainSlots.deallocate()
        state.deallocate()
    }

    @inline(__always)
    func descriptor(_ slot: Int) -> UnsafeMutableRawPointer { memory.descriptors + slot * PackedLayout.descriptorSize }

    public func add(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) -> UInt16? {
        let count = segments.count
        guard count > 0, count <= state.pointee.freeSlots else { return nil }
        let id = state.pointee.freeIDHead
        state.pointee.freeIDHead = nextFree[Int(id)]
        let head = Int(state.pointee.nextAvail)
        var slot = head
        var wrap = state.pointee.availWrap
        var headFlags: UInt16 = 0
        for i in 0..<count {
            let s = segments[i]
            var flags = PackedLayout.availableMarker(wrap: wrap)
            if i + 1 < count { flags |= PackedLayout.flagNext }
            if s.deviceWritable { flags |= PackedLayout.flagWrite }
            let d = descriptor(slot)
            SharedAccess.store64(d + PackedLayout.descAddr, s.address)
            SharedAccess.store32(d + PackedLayout.descLen, s.length)
            SharedAccess.store16(d + PackedLayout.descID, id)
            if i == 0 { headFlags = flags } else { SharedAccess.store16(d + PackedLayout.descFlags, flags) }
            slot += 1
            if slot == size {
                slot = 0
                wrap.toggle()
            }
        }
        if state.pointee.hasPending {
            SharedAccess.store16Release(descriptor(head) + PackedLayout.descFlags, headFlags)
        } else {
            state.pointee.pendingSlot = UInt16(truncatingIfNeeded: head)
            state.pointee.pendingFlags = headFlags
            state.pointee.hasPending = true
        }
        state.pointee.nextAvail = UInt16(truncatingIfNeeded: slot)
        state.pointee.availWrap = wrap
        state.pointee.freeSlots -= count
        tokens[Int(id)] = token
        chainSlots[Int(id)] = UInt16(truncatingIfNeeded: count)
        return id
    }

    public func publish() -> Bool {
        guard state.pointee.hasPending else { return false }
        SharedAccess.store16Release(
            descriptor(Int(state.pointee.pendingSlot)) + PackedLayout.descFlags, state.pointee.pendingFlags)
        state.pointee.hasPending = false
        SharedAccess.fullFence()
        let snapshot = SharedAccess.load32(memory.used)
        return UInt16(truncatingIfNeeded: snapshot >> 16) != PackedLayout.eventFlagDisable
    }

    /// The next completion, unchecked: id and len straight from the ring.
    public func nextCompletion() -> TrustedCompletion? {
        let slot = Int(state.pointee.lastUsed)
        let wrap = state.pointee.usedWrap
        let d = descriptor(slot)
        let flags = SharedAccess.load16Acquire(d + PackedLayout.descFlags)
        let used = flags & PackedLayout.flagUsed != 0
        let avail = flags & PackedLayout.flagAvail != 0
        guard used == avail, used == wrap else { return nil }
        let id = Int(SharedAccess.load16(d + PackedLayout.descID))  // trusting: anything
        let length = SharedAccess.load32(d + PackedLayout.descLen)
        let token = tokens[id]
        let count = Int(chainSlots[id])  // indexed by whatever id the device wrote
        var last = slot + count
        var newWrap = wrap
        if last >= size {
            last -= size
            newWrap.toggle()
        }
        state.pointee.lastUsed = UInt16(truncatingIfNeeded: last)
        state.pointee.usedWrap = newWrap
        state.pointee.freeSlots += count
        nextFree[id] = state.pointee.freeIDHead
        state.pointee.freeIDHead = UInt16(truncatingIfNeeded: id)
        return TrustedCompletion(token: token, head: UInt16(truncatingIfNeeded: id), length: length)
    }
}
