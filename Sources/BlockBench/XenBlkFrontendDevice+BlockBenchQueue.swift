public import XenRing

extension BlockBench {
    /// The loop on a Xen frontend (`xen-blk bench`, `xen-bench`), specialized.
    public func run(_ device: XenBlkFrontendDevice, progress: BlockBenchProgress? = nil)
        -> BlockBenchReport<XenBlkError>
    {
        runLoop(device, progress: progress)
    }
}

/// Xen blkif: the frontend's one ring (at most `BlkifLayout.ringSize` in flight). A
/// response other than OKAY is a failed request; a violation disables the device and
/// is thrown.
extension XenBlkFrontendDevice: BlockBenchQueue {
    public func submit(slot: Int, buffer: UnsafeMutableRawBufferPointer, offset: UInt64, write: Bool)
        throws(XenBlkError)
    {
        let sector = offset / UInt64(BlkifLayout.sectorSize)
        if write {
            try submitWrite(sector: sector, from: UnsafeRawBufferPointer(buffer), token: UInt64(slot))
        } else {
            try submitRead(sector: sector, into: buffer, token: UInt64(slot))
        }
    }

    public func nextCompletion() throws(XenBlkError) -> BlockBenchCompletion<XenBlkError>? {
        try poll().map(Self.benchCompletion)
    }

    public func waitForNextCompletion() throws(XenBlkError) -> BlockBenchCompletion<XenBlkError>? {
        try waitForCompletion().map(Self.benchCompletion)
    }

    static func benchCompletion(_ c: BlkCompletion) -> BlockBenchCompletion<XenBlkError> {
        BlockBenchCompletion(
            slot: Int(truncatingIfNeeded: c.token), failure: c.status == .okay ? nil : .status(c.status))
    }
}
