import Atomics

#if _endian(big)
#error("RingFence targets little-endian hosts: virtio and Xen ring fields are little-endian")
#endif

/// Loads and stores on memory the other side can write at any time.
///
/// Every value fetched from shared memory goes through one of these: an atomic load is a
/// single load the compiler cannot repeat or tear (Linux's READ_ONCE), which is what rule
/// R2 (single fetch) needs. Each names its ordering, as rust-vmm's accessors do. On x86
/// relaxed and acquire loads and release stores are plain moves. (Orderings are part of
/// the name because swift-atomics needs them as compile-time constants.)
public enum SharedAccess {
    @inline(__always)
    public static func load16(_ p: UnsafeMutableRawPointer) -> UInt16 {
        UnsafeAtomic<UInt16>(at: p.assumingMemoryBound(to: UInt16.AtomicRepresentation.self))
            .load(ordering: .relaxed)
    }

    @inline(__always)
    public static func load16Acquire(_ p: UnsafeMutableRawPointer) -> UInt16 {
        UnsafeAtomic<UInt16>(at: p.assumingMemoryBound(to: UInt16.AtomicRepresentation.self))
            .load(ordering: .acquiring)
    }

    @inline(__always)
    public static func store16(_ p: UnsafeMutableRawPointer, _ value: UInt16) {
        UnsafeAtomic<UInt16>(at: p.assumingMemoryBound(to: UInt16.AtomicRepresentation.self))
            .store(value, ordering: .relaxed)
    }

    @inline(__always)
    public static func store16Release(_ p: UnsafeMutableRawPointer, _ value: UInt16) {
        UnsafeAtomic<UInt16>(at: p.assumingMemoryBound(to: UInt16.AtomicRepresentation.self))
            .store(value, ordering: .releasing)
    }

    @inline(__always)
    public static func load32(_ p: UnsafeMutableRawPointer) -> UInt32 {
        UnsafeAtomic<UInt32>(at: p.assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
            .load(ordering: .relaxed)
    }

    @inline(__always)
    public static func load32Acquire(_ p: UnsafeMutableRawPointer) -> UInt32 {
        UnsafeAtomic<UInt32>(at: p.assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
            .load(ordering: .acquiring)
    }

    @inline(__always)
    public static func store32(_ p: UnsafeMutableRawPointer, _ value: UInt32) {
        UnsafeAtomic<UInt32>(at: p.assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
            .store(value, ordering: .relaxed)
    }

    @inline(__always)
    public static func store32Release(_ p: UnsafeMutableRawPointer, _ value: UInt32) {
        UnsafeAtomic<UInt32>(at: p.assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
            .store(value, ordering: .releasing)
    }

    @inline(__always)
    public static func load64(_ p: UnsafeMutableRawPointer) -> UInt64 {
        UnsafeAtomic<UInt64>(at: p.assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
            .load(ordering: .relaxed)
    }

    @inline(__always)
    public static func load64Acquire(_ p: UnsafeMutableRawPointer) -> UInt64 {
        UnsafeAtomic<UInt64>(at: p.assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
            .load(ordering: .acquiring)
    }

    @inline(__always)
    public static func store64(_ p: UnsafeMutableRawPointer, _ value: UInt64) {
        UnsafeAtomic<UInt64>(at: p.assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
            .store(value, ordering: .relaxed)
    }

    @inline(__always)
    public static func store64Release(_ p: UnsafeMutableRawPointer, _ value: UInt64) {
        UnsafeAtomic<UInt64>(at: p.assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
            .store(value, ordering: .releasing)
    }

    /// Single loads of fields that may be unaligned (descriptors in an indirect table the
    /// peer placed anywhere). The value is loaded once into a local and never re-read.
    @inline(__always)
    public static func load16Unaligned(_ p: UnsafeRawPointer) -> UInt16 {
        p.loadUnaligned(as: UInt16.self)
    }

    @inline(__always)
    public static func load32Unaligned(_ p: UnsafeRawPointer) -> UInt32 {
        p.loadUnaligned(as: UInt32.self)
    }

    @inline(__always)
    public static func load64Unaligned(_ p: UnsafeRawPointer) -> UInt64 {
        p.loadUnaligned(as: UInt64.self)
    }

    /// Orders the relaxed loads before it before every load after it: one acquire for a
    /// group of flags loaded relaxed (the packed device's batch of four), instead of one
    /// per load.
    @inline(__always)
    public static func acquireFence() {
        atomicMemoryFence(ordering: .acquiring)
    }

    /// The full fence between "publish my index" and "read whether the peer sleeps";
    /// without it a wake-up can be lost (store-load reordering).
    @inline(__always)
    public static func fullFence() {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
    }

    /// Copies foreign bytes once into private memory (for payloads; R2).
    @inline(__always)
    public static func copy(
        from source: UnsafeRawPointer, to destination: UnsafeMutableRawPointer, count: Int
    ) {
        destination.copyMemory(from: source, byteCount: count)
    }
}
