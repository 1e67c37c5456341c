#if canImport(Glibc)
import Glibc
#endif

/// A pthread mutex around a value. ThreadSanitizer sees pthread locks; it does not see
/// `Synchronization.Mutex`'s futex on Linux and reports code that shares state through
/// one as racing (docs/async.md, "Thread Sanitizer"), so a race it reports under this
/// lock is real. Used wherever the TSan suites of `.ci/run` reach.
package final class Locked<Value>: @unchecked Sendable {
    // @unchecked Sendable: `value` is read and written only inside `withLock`.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    package init(_ value: Value) {
        self.value = value
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    package func withLock<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
