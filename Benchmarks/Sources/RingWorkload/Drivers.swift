import SharedMemory
import TrustingRing
import Virtqueue

/// The two contestants behind one face, so every workload is the same generic code,
/// specialized once per driver (no dynamic dispatch per request).
protocol BenchDriver {
    func post(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) -> Bool
    func publish()
    /// (token, length) of the next completion, or nil.
    func poll() -> (token: UInt64, length: UInt32)?
}

/// The library's hardened driver.
struct HardenedDriver: BenchDriver {
    let queue: DriverQueue

    @inline(__always)
    func post(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) -> Bool {
        do { try queue.add(segments, token: token) } catch { return false }
        return true
    }

    @inline(__always)
    func publish() { _ = queue.publish() }

    @inline(__always)
    func poll() -> (token: UInt64, length: UInt32)? {
        do {
            guard let c = try queue.nextCompletion() else { return nil }
            return (c.token, c.length)
        } catch {
            // Our own device never violates; a violation here is a benchmark bug.
            fatalError("hardened driver broke the queue: \(error)")
        }
    }
}

/// The trusting baseline (Benchmarks only, R8).
struct TrustingDriver: BenchDriver {
    let queue: TrustingDriverQueue

    @inline(__always)
    func post(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) -> Bool {
        queue.add(segments, token: token) != nil
    }

    @inline(__always)
    func publish() { _ = queue.publish() }

    @inline(__always)
    func poll() -> (token: UInt64, length: UInt32)? {
        guard let c = queue.nextCompletion() else { return nil }
        return (c.token, c.length)
    }
}

/// The library's hardened packed driver.
struct PackedHardenedDriver: BenchDriver {
    let queue: PackedDriverQueue

    @inline(__always)
    func post(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) -> Bool {
        do { try queue.add(segments, token: token) } catch { return false }
        return true
    }

    @inline(__always)
    func publish() { _ = queue.publish() }

    @inline(__always)
    func poll() -> (token: UInt64, length: UInt32)? {
        do {
            guard let c = try queue.nextCompletion() else { return nil }
            return (c.token, c.length)
        } catch {
            fatalError("hardened packed driver broke the queue: \(error)")
        }
    }
}

/// The trusting packed baseline (Benchmarks only, R8).
struct PackedTrustingDriver: BenchDriver {
    let queue: TrustingPackedDriverQueue

    @inline(__always)
    func post(_ segments: UnsafeBufferPointer<Segment>, token: UInt64) -> Bool {
        queue.add(segments, token: token) != nil
    }

    @inline(__always)
    func publish() { _ = queue.publish() }

    @inline(__always)
    func poll() -> (token: UInt64, length: UInt32)? {
        guard let c = queue.nextCompletion() else { return nil }
        return (c.token, c.length)
    }
}
