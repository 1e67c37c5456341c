public import VirtioBlock

extension BlockBench {
    /// The loop on one virtio-blk queue (`blk bench`), specialized.
    public func run(_ queue: BlockQueue, progress: BlockBenchProgress? = nil) -> BlockBenchReport<VirtioError> {
        runLoop(queue, progress: progress)
    }
}

/// virtio-blk: one `BlockQueue` of a `VirtioBlockDriver` (`ringfence blk bench` runs one loop
/// per queue). Its `wait` ends at the earliest request deadline (then the device broke).
extension BlockQueue: BlockBenchQueue {
    public func submit(slot: Int, buffer: UnsafeMutableRawBufferPointer, offset: UInt64, write: Bool)
        throws(VirtioError)
    {
        if write {
            try submitWrite(offset: offset, from: UnsafeRawBufferPointer(buffer), tag: UInt64(slot))
        } else {
            try submitRead(offset: offset, into: buffer, tag: UInt64(slot))
        }
    }

    public func nextCompletion() throws(VirtioError) -> BlockBenchCompletion<VirtioError>? {
        poll().map(Self.benchCompletion)
    }

    public func waitForNextCompletion() throws(VirtioError) -> BlockBenchCompletion<VirtioError>? {
        wait(until: .distantFuture).map(Self.benchCompletion)
    }

    static func benchCompletion(_ c: BlockCompletion) -> BlockBenchCompletion<VirtioError> {
        if case .failure(let e) = c.result {
            return BlockBenchCompletion(slot: Int(truncatingIfNeeded: c.tag), failure: e)
        }
        return BlockBenchCompletion(slot: Int(truncatingIfNeeded: c.tag), failure: nil)
    }
}
