/// Fixed-size tables in private memory for the hot path: allocated once, never shared,
/// no copy-on-write or uniqueness checks. Every index used with them is either our own
/// (a free-list entry) or was range-checked against the table first (R3 before R4).
final class PrivateTable<Element> {
    let base: UnsafeMutablePointer<Element>
    let count: Int

    init(repeating value: Element, count: Int) {
        self.count = max(0, count)
        base = .allocate(capacity: max(1, count))
        base.initialize(repeating: value, count: max(1, count))
    }

    deinit {
        base.deinitialize(count: max(1, count))
        base.deallocate()
    }

    @inline(__always)
    subscript(index: Int) -> Element {
        get { base[index] }
        set { base[index] = newValue }
    }
}

/// A bounded stack (free lists of ids, frames, grant refs) in private memory.
final class PrivateStack<Element> {
    let base: UnsafeMutablePointer<Element>
    let capacity: Int
    @exclusivity(unchecked) private(set) var count = 0

    init(capacity: Int) {
        self.capacity = max(0, capacity)
        base = .allocate(capacity: max(1, capacity))
    }

    deinit {
        base.deinitialize(count: count)
        base.deallocate()
    }

    /// Drops the element when full (cannot happen for free lists sized to their table).
    @inline(__always)
    func push(_ value: Element) {
        guard count < capacity else { return }
        (base + count).initialize(to: value)
        count += 1
    }

    @inline(__always)
    func pop() -> Element? {
        guard count > 0 else { return nil }
        count -= 1
        return (base + count).move()
    }
}
