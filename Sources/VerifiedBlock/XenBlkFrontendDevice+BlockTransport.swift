import SharedMemory
public import XenRing

/// Xen blkif: the batch goes on the frontend's one ring, up to its free slots in flight.
extension XenBlkFrontendDevice: BlockTransport {
    public var capacityBytes: UInt64 { info.sectors &* UInt64(BlkifLayout.sectorSize) }

    public func transfer(_ requests: [TransportRequest]) throws(TransportError) {
        var next = 0
        var outstanding = 0
        var firstError: XenBlkError?
        while true {
            while next < requests.count && firstError == nil {
                let r = requests[next]
                let sector = r.offset / UInt64(BlkifLayout.sectorSize)
                do throws(XenBlkError) {
                    if r.write {
                        try submitWrite(sector: sector, from: UnsafeRawBufferPointer(r.buffer), token: UInt64(next))
                    } else {
                        try submitRead(sector: sector, into: r.buffer, token: UInt64(next))
                    }
                } catch {
                    let roomLater = error == .submit(.full) || error == .submit(.noBounceSpace)
                    if roomLater && outstanding > 0 { break }
                    firstError = error
                    break
                }
                next += 1
                outstanding += 1
            }
            kick()
            if outstanding == 0 { break }
            do throws(XenBlkError) {
                guard let c = try waitForCompletion() else {
                    firstError = firstError ?? .broken(.deadlineExceeded(milliseconds: 0))
                    break
                }
                outstanding -= 1
                if c.status != .okay && firstError == nil { firstError = .status(c.status) }
            } catch {
                firstError = firstError ?? error
                break
            }
        }
        if let firstError {
            let rule: Rule? = if case .broken(let v) = firstError { v.rule } else { nil }
            throw TransportError(rule: rule, "xen blkif: \(firstError)")
        }
    }

    public func flushWrites() throws(TransportError) {
        guard info.flushCache else { return }
        do throws(XenBlkError) {
            try self.flush()
        } catch {
            throw TransportError(rule: nil, "xen blkif: \(error)")
        }
    }
}
