import Synchronization

/// A count that tasks and threads share (relaxed: tests read it after the fact or poll it).
public final class SharedCounter: Sendable {
    let value = Atomic<Int>(0)
    public init() {}
    public func add() { value.add(1, ordering: .relaxed) }
    public var count: Int { value.load(ordering: .relaxed) }
    public func reset() { value.store(0, ordering: .relaxed) }
}
