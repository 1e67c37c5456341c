import SharedMemory
import Synchronization

/// What a `VirtioNetDriver` and its queue pairs share, and nothing else: the sticky
/// failure (R6: the first one wins and reaches `onFailure` once). A queue's hot path
/// reads one word of it (`isBroken`), never the device.
final class NetSupervisor: Sendable {
    let broken = Atomic<Bool>(false)
    let first = Mutex<NetError?>(nil)
    let onFailure: (@Sendable (NetError) -> Void)?

    init(onFailure: (@Sendable (NetError) -> Void)?) { self.onFailure = onFailure }

    @inline(__always)
    var isBroken: Bool { broken.load(ordering: .relaxed) }

    var failure: NetError? { first.withLock { $0 } }

    /// Records the first failure; later ones are dropped. Returns the sticky failure.
    @discardableResult
    func fail(_ error: NetError) -> NetError {
        let (winner, isFirst) = first.withLock { f -> (NetError, Bool) in
            if let f { return (f, false) }
            f = error
            return (error, true)
        }
        if isFirst {
            broken.store(true, ordering: .releasing)
            onFailure?(winner)
        }
        return winner
    }
}
