/// What a block transport hands the benchmark loop: one queue on which `BlockBench`
/// keeps requests in flight. Each transport feeds it through its own public calls
/// (`BlockQueue+BlockBenchQueue.swift`, `XenBlkFrontendDevice+BlockBenchQueue.swift`),
/// so the transports themselves carry no benchmark code.
public protocol BlockBenchQueue {
    associatedtype Failure: Error
    /// Posts a transfer of all of `buffer` at byte `offset` whose completion names `slot`;
    /// `kick()` makes it visible to the device.
    func submit(slot: Int, buffer: UnsafeMutableRawBufferPointer, offset: UInt64, write: Bool) throws(Failure)
    /// Publishes what was posted and notifies the device if it asked.
    func kick()
    /// The next completion if one is ready; never blocks.
    func nextCompletion() throws(Failure) -> BlockBenchCompletion<Failure>?
    /// Waits for the next completion within the transport's own request deadline (R5);
    /// nil when nothing is in flight.
    func waitForNextCompletion() throws(Failure) -> BlockBenchCompletion<Failure>?
}

/// One finished benchmark request: the buffer slot it used and, if it failed, why.
public struct BlockBenchCompletion<Failure: Error> {
    public var slot: Int
    public var failure: Failure?

    public init(slot: Int, failure: Failure?) {
        self.slot = slot
        self.failure = failure
    }
}
