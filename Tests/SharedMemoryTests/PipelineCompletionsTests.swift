import Testing

@testable import SharedMemory

/// The bookkeeping `BlockPipeline` and `XenBlkPipeline` share: every admitted request is
/// delivered once, the stream ends after `finish()` with the last delivery, and nothing is
/// admitted after `finish()`.
@Suite struct PipelineCompletionsTests {
    struct Failure: Error, Equatable {}

    @Test(.timeLimit(.minutes(1))) func streamEndsWithTheLastDeliveryAfterFinish() async {
        let p = PipelineCompletions<Failure>()
        #expect(p.admit())
        #expect(p.admit())
        p.deliver(IOCompletion(tag: 1, result: .success([1])))
        p.finish()
        #expect(!p.admit())  // refused after finish(), and not counted
        p.deliver(IOCompletion(tag: 2, result: .failure(Failure())))
        var tags: [UInt64] = []
        for await c in p.stream { tags.append(c.tag) }  // ends: both delivered
        #expect(tags == [1, 2])
    }

    @Test(.timeLimit(.minutes(1))) func finishWithNothingOutstandingEndsAtOnce() async {
        let p = PipelineCompletions<Failure>()
        p.finish()
        var n = 0
        for await _ in p.stream { n += 1 }
        #expect(n == 0)
    }
}
