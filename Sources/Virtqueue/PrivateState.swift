/// The one private-state idiom of the ring queues: each queue keeps its indices, counters
/// and sticky violation in a `State` struct behind an `UnsafeMutablePointer` it allocates
/// once and owns (tables likewise), never in stored `var`s or Arrays, which pay dynamic
/// exclusivity and uniqueness checks on every access (docs/design.md §5). Every
/// `.pointee` in the queues is on such memory, never on a structure the peer wrote.
extension UnsafeMutablePointer {
    /// A single private value, initialized.
    @inline(__always)
    static func owned(_ value: Pointee) -> UnsafeMutablePointer<Pointee> {
        let p = UnsafeMutablePointer<Pointee>.allocate(capacity: 1)
        p.initialize(to: value)
        return p
    }

    /// Deinitializes and frees what `owned` (or an initialized allocation of `count`) made.
    @inline(__always)
    func release(count: Int = 1) {
        deinitialize(count: count)
        deallocate()
    }
}

/// A queue's first violation, sticky until reset (R6). `broken` mirrors `violation != nil`
/// so the hot path checks one byte.
struct QueueHealth {
    private(set) var broken = false
    private(set) var violation: Violation?

    /// Records `v` unless a violation is already there; returns the one that stays.
    @inline(__always)
    mutating func fail(_ v: Violation) -> Violation {
        if let violation { return violation }
        violation = v
        broken = true
        return v
    }

    /// The violation that broke the queue, for the cold path after `broken` was checked
    /// (the hot path loads one byte and never copies the optional).
    var sticky: Violation {
        @inline(never) get { violation ?? .brokenAbove(rule: .r6, reason: "queue broken") }
    }
}

/// A position in a packed ring: a slot and the wrap counter of its lap (both start at 1).
struct RingPosition: Equatable {
    var slot: UInt16
    var wrap: Bool

    /// Moves on by `count` slots (at most `size`), toggling the wrap counter past the end.
    @inline(__always)
    mutating func advance(by count: Int, size: Int) {
        var next = Int(slot) + count
        if next >= size {
            next -= size
            wrap.toggle()
        }
        slot = UInt16(truncatingIfNeeded: next)
    }

    /// off_wrap as an event suppression structure encodes this position.
    @inline(__always)
    var offWrap: UInt16 { slot | (wrap ? PackedLayout.eventWrapBit : 0) }
}
