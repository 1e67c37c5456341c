#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Testing

@testable import SharedMemory

/// A transport the test scripts: it accepts every piece, completes none until `finishing`,
/// counts its polls, and holds the engine thread at `exclusively` until `gate` opens (so the
/// test alone drives, through `IOEngine.drive`, as an awaiting caller would).
final class ScriptedTransport: IOTransport, @unchecked Sendable {
    // @unchecked: `posted` is touched only by the drive-token holder; the rest are atomics.
    struct Failure: Error, Sendable {}
    let maxPieceBytes = 4096
    let polls = Atomic<Int>(0)
    let entered = Atomic<Bool>(false)
    let gate = Atomic<Bool>(false)
    let finishing = Atomic<Bool>(false)
    var posted: [UInt64] = []

    func post(_ piece: IOPiece, tag: UInt64) throws(Failure) -> Bool {
        posted.append(tag)
        return true
    }

    func publish() {}

    func nextCompletion() -> (tag: UInt64, failure: Failure?)? {
        polls.add(1, ordering: .relaxed)
        guard finishing.load(ordering: .acquiring), !posted.isEmpty else { return nil }
        return (posted.removeFirst(), nil)
    }

    var inFlight: Int { posted.count }

    func waitForCompletion(orWake wake: Notifier) { sleepNanoseconds(100_000) }

    func exclusively(_ body: () -> Void) {
        entered.store(true, ordering: .releasing)
        while !gate.load(ordering: .acquiring) { sleepNanoseconds(100_000) }
        body()
    }

    var closedFailure: Failure { Failure() }
    var noRoomFailure: Failure { Failure() }
    func engineStopped() {}
    var callersMayDrive: Bool { true }
    /// Long enough that a spin is unmistakable in the poll count.
    var inlineSpinNanoseconds: UInt64 { 20_000_000 }
}

/// Issue 20, the spin rule of callers that drive the engine's queue: a submitting caller
/// polls the ring inline (up to the transport's spin) only when no resumed caller is left
/// to look at the queue; while one is (`pendingResumes` > 0), it posts, looks once and
/// returns, leaving the looking to the resumed caller (a pool thread spinning while
/// resumed callers wait for a thread delayed them all: docs/async.md).
@Suite("async engine: when a caller spins", .serialized)
struct AsyncEngineSpinTests {
    func read(_ tag: UInt64) -> IOOperation<ScriptedTransport.Failure> {
        IOOperation(kind: .read, offset: 0, count: 4096, delivery: .stream(tag: tag) { _ in })
    }

    @Test(.timeLimit(.minutes(1))) func aSubmitterSpinsOnlyWhenNoResumedCallerWillLook() async throws {
        let transport = ScriptedTransport()
        let engine = try IOEngine(transport: transport)
        // A first request takes the engine thread to the lease, where the gate holds it:
        // from then on only this test drives.
        #expect(engine.enqueue(read(1)))
        while !transport.entered.load(ordering: .acquiring) { sleepNanoseconds(100_000) }
        engine.leased.store(true, ordering: .sequentiallyConsistent)

        // A resumed caller is on its way: the submitter posts, polls once, and returns.
        engine.pendingResumes.store(1, ordering: .sequentiallyConsistent)
        var polls = transport.polls.load(ordering: .relaxed)
        #expect(engine.submit(read(2), spin: true))
        #expect(engine.posted == 2)
        let withResumes = transport.polls.load(ordering: .relaxed) - polls
        #expect(withResumes <= 2)

        // Nobody else will look: the submitter spins for the transport's spin.
        engine.pendingResumes.store(0, ordering: .sequentiallyConsistent)
        polls = transport.polls.load(ordering: .relaxed)
        #expect(engine.submit(read(3), spin: true))
        #expect(engine.posted == 3)
        let alone = transport.polls.load(ordering: .relaxed) - polls
        #expect(alone > 100)

        // Let everything complete and the engine stop.
        engine.leased.store(false, ordering: .sequentiallyConsistent)
        transport.finishing.store(true, ordering: .releasing)
        transport.gate.store(true, ordering: .releasing)
        engine.stop()
        let end = ContinuousClock.now + .seconds(10)
        while engine.held > 0 && ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(1)) }
        #expect(engine.held == 0)
    }
}
