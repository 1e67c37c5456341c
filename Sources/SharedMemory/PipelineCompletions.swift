/// The bookkeeping a pipeline of async requests shares (`BlockPipeline`,
/// `XenBlkPipeline`): the stream of tagged completions, the requests posted and not yet
/// delivered, and `finish()`, after which the stream ends once none is outstanding.
///
/// A request is `admit`ted before it is posted (refused after `finish()`), and every
/// admitted request is `deliver`ed exactly once (its completion, or the failure that kept
/// it from the device); the last delivery after `finish()` ends the stream.
package final class PipelineCompletions<Failure: Error & Sendable>: Sendable {
    package typealias Completion = IOCompletion<Failure>

    /// Completions in the order they were delivered.
    package let stream: AsyncStream<Completion>
    let continuation: AsyncStream<Completion>.Continuation
    /// Requests admitted and not yet delivered, and whether `finish()` was called.
    let accounting = Locked<(outstanding: Int, finishing: Bool)>((0, false))

    package init() {
        (stream, continuation) = AsyncStream.makeStream(of: Completion.self)
    }

    /// Counts one more request; false (nothing counted) once `finish()` was called.
    package func admit() -> Bool {
        accounting.withLock { a -> Bool in
            if a.finishing { return false }
            a.outstanding += 1
            return true
        }
    }

    /// Hands an admitted request's completion to the stream; the last one after
    /// `finish()` ends it.
    package func deliver(_ completion: Completion) {
        continuation.yield(completion)
        let end = accounting.withLock { a -> Bool in
            a.outstanding -= 1
            return a.finishing && a.outstanding == 0
        }
        if end { continuation.finish() }
    }

    /// No more requests: the stream ends once those admitted have been delivered.
    package func finish() {
        let end = accounting.withLock { a -> Bool in
            a.finishing = true
            return a.outstanding == 0
        }
        if end { continuation.finish() }
    }
}
