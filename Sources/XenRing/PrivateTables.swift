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

    /// `pop` for a caller that counted first (`count > 0`, checked by it, e.g. once per
    /// batch in `NetFrontend.submitBatch`).
    @inline(__always)
    func popCounted() -> Element {
        count &-= 1
        return (base + count).move()
    }
}

/// A bounded FIFO queue (the rx page pool: pages come back in the order they were
/// posted, so consecutive ring positions keep consecutive pages and grant refs) in
/// private memory.
final class PrivateQueue<Element> {
    let base: UnsafeMutablePointer<Element>
    let capacity: Int
    @exclusivity(unchecked) private(set) var count = 0
    @exclusivity(unchecked) private var head = 0

    init(capacity: Int) {
        self.capacity = max(0, capacity)
        base = .allocate(capacity: max(1, capacity))
    }

    deinit {
        for i in 0..<count { (base + (head + i) % max(1, capacity)).deinitialize(count: 1) }
        base.deallocate()
    }

    /// At the tail; dropped when full (cannot happen for a pool sized to its pages).
    @inline(__always)
    func push(_ value: Element) {
        guard count < capacity else { return }
        var tail = head &+ count
        if tail >= capacity { tail &-= capacity }
        (base + tail).initialize(to: value)
        count &+= 1
    }

    @inline(__always)
    func pop() -> Element? {
        guard count > 0 else { return nil }
        let value = (base + head).move()
        head &+= 1
        if head == capacity { head = 0 }
        count &-= 1
        return value
    }

    /// `pop` for a caller that counted first (`count > 0`, checked by it, e.g. once per
    /// batch in `NetFrontend.refillRx`).
    @inline(__always)
    func popCounted() -> Element {
        let value = (base + head).move()
        head &+= 1
        if head == capacity { head = 0 }
        count &-= 1
        return value
    }
}
