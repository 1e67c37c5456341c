import SharedMemory
import Virtqueue

/// The device both contestants talk to: the library's hardened `DeviceQueue` (or
/// `PackedDeviceQueue` for the packed contestants; specialized per ring). For each
/// chain it copies the first readable buffer into the first writable one and completes
/// with the bytes copied (an echo without per-byte work, so ring costs dominate).
struct CopyDevice<Q: DeviceRing> {
    let queue: Q
    let memory: GuestMemory
    var chain = DescriptorChain()
    /// Chains served in total (read by the owner thread only).
    var served = 0

    init(queue: Q, memory: GuestMemory) {
        self.queue = queue
        self.memory = memory
    }

    /// Serves at most `budget` chains; returns how many. Does not publish.
    @inline(__always)
    mutating func serve(budget: Int) -> Int {
        var n = 0
        while n < budget {
            let fetch: ChainFetch
            do { fetch = try queue.nextChain(into: &chain, memory: memory) } catch {
                fatalError("device saw a violation: \(error)")
            }
            switch fetch {
            case .empty:
                served += n
                return n
            case .rejected(let head, _):
                queue.complete(head: head, length: 0)
            case .ready:
                var length = 0
                let segments = chain.segments
                let w = chain.firstWritable
                if w > 0, w < segments.count {
                    let src = segments[0].buffer
                    let dst = segments[w].buffer
                    if let s = src.baseAddress, let d = dst.baseAddress {
                        length = min(src.count, dst.count)
                        d.copyMemory(from: s, byteCount: length)
                    }
                }
                queue.complete(head: chain.head, length: UInt32(truncatingIfNeeded: length))
            }
            n += 1
        }
        served += n
        return n
    }
}
