import SharedMemory
import Virtqueue

/// A completion as the trusting driver sees it: whatever the device wrote.
public struct TrustedCompletion: Sendable, Equatable {
    public let token: UInt64
    public let head: UInt16
    public let length: UInt32
}

/// BASELINE ONLY — never use outside the benchmarks (docs/design.md R8: the library has one
/// mode, hardened). A deliberately trusting split-ring driver in the style of Linux's
/// `virtio_ring.c` before the 2021 hardening:
///
/// - the free list lives in the shared descriptor table (`desc[i].next`) and is read
///   back from it when posting (no private shadow, breaks R1);
/// - the last descriptor's NEXT flag is cleared by a read-modify-write of shared memory;
/// - a completion's `id` and `len` are used as the device wrote them: no range check, no
///   in-flight check, no length check (breaks R3); a hostile id indexes private memory;
/// - a chain is freed by following `flags`/`next` in the shared table (an unbounded walk
///   the device controls, breaks R5).
///
/// Everything else matches `DriverQueue` so the two differ only in hardening: same ring
/// memory (`DriverRingMemory`), same `SharedAccess` primitives and orderings, same
/// batching (used.idx loaded once per batch, avail.idx published once per batch with a
/// full fence before reading the device's flags or avail_event). Indirect descriptors are
/// not implemented; EVENT_IDX is, as in `DriverQueue` (off unless asked: the ring
/// benchmarks negotiate it not, the block benchmark against real back-ends does).
///
/// Private state sits behind raw pointers, as C would have it (no Array bounds or
/// uniqueness checks, no dynamic exclusivity checks on class properties).
public final class TrustingDriverQueue {
    struct State {
        var freeHead: UInt16 = 0
        var availIndex: UInt16 = 0
        var publishedIndex: UInt16 = 0
        var lastUsed: UInt16 = 0
        var usedSnapshot: UInt16 = 0
        var freeCount = 0
    }

    public let memory: DriverRingMemory
    public let queueSize: UInt16
    /// VIRTIO_F_RING_EVENT_IDX negotiated: kicks follow avail_event, interrupts used_event.
    public let eventIndex: Bool
    let mask: UInt16
    /// `desc_state[head].data`: the caller's token per head.
    let tokens: UnsafeMutablePointer<UInt64>
    let state: UnsafeMutablePointer<State>

    public var freeCount: Int { state.pointee.freeCount }
    public var lastUsed: UInt16 { state.pointee.lastUsed }

    /// Takes over a zeroed ring and threads the free list through the shared table.
    public init(memory: DriverRingMemory, eventIndex: Bool = false) {
        self.memory = memory
        self.eventIndex = eventIndex
        self.queueSize = memory.queueSize
        self.mask = memory.queueSize &- 1
        let n = Int(memory.queueSize)
        tokens = .allocate(capacity: n)
        tokens.initialize(repeating: 0, count: n)
        state = .allocate(capacity: 1)
        state.initialize(to: State(freeCount: n))
        for i in 0..<n {
            SharedAccess.store16(
                memory.descriptors + i * SplitLayout.descriptorSize + SplitLayout.descNext,
                UInt16(truncatingIfNeeded: i + 1))
        }
    }

    deinit {
        tokens.deallocate()
        state.deallocate()
    }

    /// Posts one request; nil if there are not enough free descriptors (the one check
    /// Linux always made, on private `num_free`).
    public func add(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) -> UInt16? {
        let count = segments.count
        guard count > 0, count <= state.pointee.freeCount else { return nil }
        let table = memory.descriptors
        let head = state.pointee.freeHead
        var i = head
        var previous = head
        for s in segments {
            let d = table + Int(i) * SplitLayout.descriptorSize
            SharedAccess.store64(d + SplitLayout.descAddr, s.address)
            SharedAccess.store32(d + SplitLayout.descLen, s.length)
            SharedAccess.store16(
                d + SplitLayout.descFlags,
                SplitLayout.flagNext | (s.deviceWritable ? SplitLayout.flagWrite : 0))
            previous = i
            // Trusting: the free list is read back from shared memory.
            i = SharedAccess.load16(d + SplitLayout.descNext)
        }
        let lastFlags = table + Int(previous) * SplitLayout.descriptorSize + SplitLayout.descFlags
        SharedAccess.store16(lastFlags, SharedAccess.load16(lastFlags) & ~SplitLayout.flagNext)
        state.pointee.freeHead = i
        state.pointee.freeCount -= count
        tokens[Int(head)] = token
        let availIndex = state.pointee.availIndex
        SharedAccess.store16(
            memory.avail + SplitLayout.availEntryOffset(Int(availIndex & mask)), head)
        state.pointee.availIndex = availIndex &+ 1
        return head
    }

    /// Same as `DriverQueue.publish()` (release store, full fence, then avail_event with
    /// EVENT_IDX or used.flags without).
    public func publish() -> Bool {
        let old = state.pointee.publishedIndex
        let new = state.pointee.availIndex
        guard old != new else { return false }
        SharedAccess.store16Release(memory.avail + SplitLayout.availIdxOffset, new)
        state.pointee.publishedIndex = new
        SharedAccess.fullFence()
        if eventIndex {
            let event = SharedAccess.load16(memory.used + SplitLayout.availEventOffset(Int(queueSize)))
            return SplitLayout.needEvent(event: event, new: new, old: old)
        }
        let flags = SharedAccess.load16(memory.used + SplitLayout.usedFlagsOffset)
        return flags & SplitLayout.usedNoNotify == 0
    }

    /// Same as `DriverQueue.enableInterrupts()`: asks for an interrupt at the next
    /// completion (used_event with EVENT_IDX; without it the trusting driver never
    /// suppresses interrupts, so there is nothing to undo). True if completions may
    /// already be pending.
    public func enableInterrupts() -> Bool {
        let lastUsed = state.pointee.lastUsed
        if eventIndex {
            SharedAccess.store16(memory.avail + SplitLayout.usedEventOffset(Int(queueSize)), lastUsed)
        }
        SharedAccess.fullFence()
        return SharedAccess.load16Acquire(memory.used + SplitLayout.usedIdxOffset) != lastUsed
    }

    /// The next completion, unchecked: id and len straight from the used ring.
    public func nextCompletion() -> TrustedCompletion? {
        let lastUsed = state.pointee.lastUsed
        if lastUsed == state.pointee.usedSnapshot {
            let published = SharedAccess.load16Acquire(memory.used + SplitLayout.usedIdxOffset)
            if published == lastUsed { return nil }
            state.pointee.usedSnapshot = published
        }
        let element = memory.used + SplitLayout.usedEntryOffset(Int(lastUsed & mask))
        let id = SharedAccess.load32(element)
        let length = SharedAccess.load32(element + 4)
        state.pointee.lastUsed = lastUsed &+ 1
        let head = Int(id)  // trusting: may be anything the device wrote
        let token = tokens[head]
        tokens[head] = 0
        // detach_buf: follow the chain in the shared table.
        let table = memory.descriptors
        var i = head
        var freed = 1
        while SharedAccess.load16(table + i * SplitLayout.descriptorSize + SplitLayout.descFlags)
            & SplitLayout.flagNext != 0
        {
            i = Int(SharedAccess.load16(table + i * SplitLayout.descriptorSize + SplitLayout.descNext))
            freed += 1
        }
        SharedAccess.store16(
            table + i * SplitLayout.descriptorSize + SplitLayout.descNext, state.pointee.freeHead)
        state.pointee.freeHead = UInt16(truncatingIfNeeded: head)
        state.pointee.freeCount += freed
        return TrustedCompletion(token: token, head: UInt16(truncatingIfNeeded: head), length: length)
    }
}
