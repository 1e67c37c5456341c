#if canImport(Glibc)
import Glibc
#endif

/// A joinable thread started by `spawnThread`.
public struct SpawnedThread: Sendable {
    let handle: pthread_t

    /// Waits for the thread to end.
    public func join() { pthread_join(handle, nil) }

    /// Lets the thread end on its own; it can no longer be joined.
    public func detach() { pthread_detach(handle) }
}

/// Starts a joinable pthread running `body`: the one thread spawner of the package (queue
/// workers, the notifier watchdog, servers).
public func spawnThread(_ body: @escaping @Sendable () -> Void) throws(SystemError) -> SpawnedThread {
    final class Box: @unchecked Sendable {
        // @unchecked Sendable: an immutable @Sendable closure, carried through pthread_create.
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(
        &thread, nil,
        { arg in
            guard let arg else { return nil }
            Unmanaged<Box>.fromOpaque(arg).takeRetainedValue().body()
            return nil
        }, box)
    guard rc == 0 else {
        Unmanaged<Box>.fromOpaque(box).release()
        throw SystemError("pthread_create", errno: .init(rawValue: rc))
    }
    return SpawnedThread(handle: thread)
}

/// Sleeps for `nanoseconds`, resuming after signals.
public func sleepNanoseconds(_ nanoseconds: UInt64) {
    guard nanoseconds > 0 else { return }
    var request = timespec(tv_sec: Int(nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}
