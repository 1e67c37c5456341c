public import VirtioBlock

/// virtio-blk: the batch goes on queue 0, up to the queue's room in flight at once. The
/// verified layer owns the driver; it does not mix with the driver's convenience calls.
extension VirtioBlockDriver: BlockTransport {
    public var capacityBytes: UInt64 { info.capacityBytes }

    public func transfer(_ requests: [TransportRequest]) throws(TransportError) {
        let q = queue(0)
        var next = 0
        var outstanding = 0
        var firstError: VirtioError?
        while true {
            while next < requests.count && firstError == nil {
                let r = requests[next]
                do throws(VirtioError) {
                    if r.write {
                        try q.submitWrite(offset: r.offset, from: UnsafeRawBufferPointer(r.buffer), tag: UInt64(next))
                    } else {
                        try q.submitRead(offset: r.offset, into: r.buffer, tag: UInt64(next))
                    }
                } catch {
                    if error == .busy && outstanding > 0 { break }
                    firstError = error
                    break
                }
                next += 1
                outstanding += 1
            }
            q.kick()
            if outstanding == 0 { break }
            guard let c = q.wait() else {
                firstError = firstError ?? .system("queue lost track of its requests")
                break
            }
            outstanding -= 1
            if case .failure(let e) = c.result, firstError == nil { firstError = e }
        }
        if let firstError { throw TransportError(rule: firstError.rule, "virtio-blk: \(firstError)") }
    }

    public func flushWrites() throws(TransportError) {
        guard info.supportsFlush else { return }
        do throws(VirtioError) {
            try self.flush()
        } catch {
            throw TransportError(rule: error.rule, "virtio-blk: \(error)")
        }
    }
}
