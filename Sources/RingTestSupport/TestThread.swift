#if canImport(Glibc)
import Glibc
#endif

/// A dedicated OS thread for tests that need a real concurrent peer. (Dispatch's global
/// queues share the 2-core pool with the test runner, so a peer queued there may not run
/// until some other test finishes.)
public final class TestThread: @unchecked Sendable {
    // @unchecked Sendable: `thread` and `started` are written once in `init`, before the
    // object is shared; `join` only reads them (test support).
    private var thread = pthread_t()
    private let body: @Sendable () -> Void
    private var started = false

    public init(_ body: @escaping @Sendable () -> Void) {
        self.body = body
        let context = Unmanaged.passRetained(self).toOpaque()
        started =
            pthread_create(
                &thread, nil,
                { raw in
                    guard let raw else { return nil }
                    Unmanaged<TestThread>.fromOpaque(raw).takeRetainedValue().body()
                    return nil
                }, context) == 0
        if !started { Unmanaged<TestThread>.fromOpaque(context).release() }
    }

    /// Waits for the body to return.
    public func join() {
        if started { pthread_join(thread, nil) }
        started = false
    }
}
