import Atomics
import SharedMemory

/// The emulated grant table: v1 entries (`GrantLayout`) in a shared memfd, and the
/// granted frames (4 KiB pages) in a second one. The frontend writes entries; the
/// "hypervisor" half of the backend sets GTF_reading/GTF_writing while it maps a page.
public struct GrantTableMemory: @unchecked Sendable {
    // @unchecked Sendable: immutable pointers into mappings both peers share by design;
    // every access through them is a `SharedAccess` load or store that expects a racing peer.
    /// The grant entries (shared: the peer may rewrite them, R2).
    public let entries: UnsafeMutableRawPointer
    /// Entries in the table.
    public let entryCount: Int
    /// The granted frames, `frameCount` pages.
    public let frames: UnsafeMutableRawPointer
    /// Frames available to grant.
    public let frameCount: Int

    /// A table of `entryCount` entries at `entries` over `frameCount` frames at `frames`.
    public init(entries: UnsafeMutableRawPointer, entryCount: Int, frames: UnsafeMutableRawPointer, frameCount: Int) {
        self.entries = entries
        self.entryCount = entryCount
        self.frames = frames
        self.frameCount = frameCount
    }

    @inline(__always)
    func flagsAtomic(_ ref: UInt32) -> UnsafeAtomic<UInt16> {
        UnsafeAtomic<UInt16>(
            at: (entries + Int(ref) * GrantLayout.entrySize).assumingMemoryBound(to: UInt16.AtomicRepresentation.self))
    }

    /// The page of `frame` (the caller bounds `frame` by `frameCount`).
    @inline(__always)
    public func page(_ frame: UInt32) -> UnsafeMutableRawPointer {
        frames + Int(frame) * SharedRingLayout.pageSize
    }
}

/// How ending foreign access went (Linux's `gnttab_try_end_foreign_access`).
public enum GrantEndResult: Equatable, Sendable {
    /// The grant ended: the page is ours again.
    case ended
    /// The backend still claims a mapping: the ref and its page are quarantined (R7).
    case stillMapped(flags: UInt16)
    /// The flags are not what we wrote: quarantined too, we cannot know who maps it.
    case scribbled(found: UInt16)
}

/// The frontend's half: hands out grant refs from a private free list (never read back
/// from the table, R1) and revokes them with an atomic try-end. A ref whose revocation
/// fails is never reused.
public final class GrantIssuer {
    /// The table the grants are written into.
    public let memory: GrantTableMemory
    /// The domain grants are issued to.
    public let backendDomain: UInt16
    private let free: PrivateStack<UInt32>
    /// Refs whose grant could not be ended (the peer still maps the page): never reused (R7).
    @exclusivity(unchecked) public private(set) var quarantined: [UInt32] = []

    /// An issuer over `memory`; refs below `GrantLayout.reservedEntries` are never handed out.
    public init(memory: GrantTableMemory, backendDomain: UInt16 = 0) {
        self.memory = memory
        self.backendDomain = backendDomain
        let first = GrantLayout.reservedEntries
        let count = memory.entryCount
        free = PrivateStack(capacity: max(0, count - first))
        // Hand out one ref per 64-byte line first (8 entries a line): the backend pins and
        // unpins entries while we try-end others, and a shared line would bounce between
        // the cores on every compare-exchange. Pops come in the order: entry 0 of every
        // line, then entry 1 of every line, ...; so the stack is filled from the other end.
        for slot in stride(from: min(7, count - 1), through: 0, by: -1) {
            for line in stride(from: (count - 1 - slot) / 8 * 8, through: 0, by: -8) {
                let ref = line + slot
                if ref < first { break }  // and so is every lower line's
                free.push(UInt32(ref))
            }
        }
    }

    /// Refs free to grant.
    public var available: Int { free.count }

    @inline(__always)
    static func expectedFlags(readOnly: Bool) -> UInt16 {
        GrantLayout.permitAccess | (readOnly ? GrantLayout.readOnly : 0)
    }

    /// Grants `frame` to the backend; the flags are stored last with release so the
    /// backend never sees a valid entry with a stale frame.
    @inline(__always)
    public func grant(frame: UInt32, readOnly: Bool) -> UInt32? {
        guard let ref = free.pop() else { return nil }
        grant(ref: ref, frame: frame, readOnly: readOnly)
        return ref
    }

    /// Takes `count` free refs without granting anything (fewer if fewer are free): the
    /// lowest ones, a contiguous block when the table is fresh, so they share cache lines
    /// with each other and not with the refs handed out later. The caller keeps them
    /// (private), grants with `grant(ref:frame:readOnly:)` and revokes with `endAccess`.
    func claim(count: Int) -> [UInt32] {
        var all: [UInt32] = []
        while let ref = free.pop() { all.append(ref) }
        let taken = Set(all.sorted().prefix(max(0, count)))
        for ref in all.reversed() where !taken.contains(ref) { free.push(ref) }  // same order as before
        return taken.sorted(by: >)  // popLast hands out the lowest first
    }

    /// One free ref without granting anything.
    func claim() -> UInt32? { free.pop() }

    /// Grants `frame` with a ref the caller holds (claimed): the whole entry is
    /// rewritten, flags last.
    @inline(__always)
    func grant(ref: UInt32, frame: UInt32, readOnly: Bool) {
        let e = memory.entries + Int(ref) * GrantLayout.entrySize
        e.storeBytes(of: backendDomain, toByteOffset: GrantLayout.domid, as: UInt16.self)
        e.storeBytes(of: frame, toByteOffset: GrantLayout.frame, as: UInt32.self)
        memory.flagsAtomic(ref).store(Self.expectedFlags(readOnly: readOnly), ordering: .releasing)
    }

    /// Revokes `ref`: one atomic compare-exchange from exactly the flags we wrote to 0.
    /// Fails (and quarantines) while GTF_reading/GTF_writing is set or the flags were
    /// scribbled — never a crash (XSA-396), never a loop.
    public func endAccess(_ ref: UInt32, readOnly: Bool) -> GrantEndResult {
        guard let found = tryEndAccess(ref, readOnly: readOnly) else { return .ended }
        if found & (GrantLayout.reading | GrantLayout.writing) != 0 { return .stillMapped(flags: found) }
        return .scribbled(found: found)
    }

    /// `endAccess` for the hot path: nil when revoked (the ref is free again), else the
    /// flags found (the ref is quarantined). The compare-exchange is the only access to
    /// the entry; acquiring, so the caller's copy-out of the page cannot be reordered before
    /// the revocation (the backend's unpin is a release). On x86 it is one `lock cmpxchg`.
    @inline(__always)
    func tryEndAccess(_ ref: UInt32, readOnly: Bool) -> UInt16? {
        let (exchanged, found) = memory.flagsAtomic(ref).compareExchange(
            expected: Self.expectedFlags(readOnly: readOnly), desired: 0, ordering: .acquiring)
        if exchanged {
            free.push(ref)
            return nil
        }
        quarantine(ref)
        return found
    }

    @inline(never)
    func quarantine(_ ref: UInt32) { quarantined.append(ref) }
}

/// The backend's half (what Xen's grant-table code does on GNTTABOP_map): check the
/// entry, pin it with GTF_reading/GTF_writing, hand out the page; the frontend wrote the
/// entry and may rewrite it at any time, so each field is loaded once (R2).
public struct GrantMapper: @unchecked Sendable {
    // @unchecked Sendable: as `GrantTableMemory` (immutable pointers, shared-access loads).
    /// The frontend's table as mapped by the backend.
    public let memory: GrantTableMemory
    /// The backend's domain: only grants to it are honoured.
    public let domain: UInt16

    /// A mapper over `memory` for `domain`.
    public init(memory: GrantTableMemory, domain: UInt16 = 0) {
        self.memory = memory
        self.domain = domain
    }

    /// Maps `ref` for reading (`write == false`) or writing; bounded retries on a racing
    /// frontend (R5).
    public func map(_ ref: UInt32, write: Bool) throws(XenViolation) -> UnsafeMutableRawPointer {
        guard Int(ref) < memory.entryCount else {
            throw .xenGrantRefOutOfRange(ref: ref, entries: memory.entryCount)
        }
        let e = memory.entries + Int(ref) * GrantLayout.entrySize
        let flags = memory.flagsAtomic(ref)
        let pin = write ? GrantLayout.writing : GrantLayout.reading
        var last: UInt16 = 0
        for _ in 0..<8 {
            let f = flags.load(ordering: .acquiring)
            last = f
            guard f & GrantLayout.typeMask == GrantLayout.permitAccess,
                !write || f & GrantLayout.readOnly == 0
            else { throw .xenGrantNotGranted(ref: ref, flags: f) }
            let domid = SharedAccess.load16(e + GrantLayout.domid)
            let frame = SharedAccess.load32(e + GrantLayout.frame)
            guard domid == domain else { throw .xenGrantNotGranted(ref: ref, flags: f) }
            guard Int(frame) < memory.frameCount else {
                throw .xenGrantRefOutOfRange(ref: ref, entries: memory.entryCount)
            }
            if flags.compareExchange(expected: f, desired: f | pin, ordering: .acquiringAndReleasing).exchanged {
                return memory.page(frame)
            }
        }
        throw .xenGrantNotGranted(ref: ref, flags: last)
    }

    /// Drops the pin taken by `map`.
    public func unmap(_ ref: UInt32, write: Bool) {
        guard Int(ref) < memory.entryCount else { return }
        let pin = write ? GrantLayout.writing : GrantLayout.reading
        _ = memory.flagsAtomic(ref).loadThenBitwiseAnd(with: ~pin, ordering: .releasing)
    }
}
