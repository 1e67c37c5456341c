import SharedMemory
import VirtioBlock
import Virtqueue

/// What the payload lies remember across requests: the contents a write replaced (for
/// `payload-older-version`), the disk at the first flush and the flushes seen (for
/// `payload-rollback`), the writes seen (for `payload-torn-write`).
struct PayloadMemory {
    var replaced: [UInt64: [UInt8]] = [:]
    var snapshot: [UInt8]?
    var flushes = 0
    var writes = 0
    var noted = false
}

extension Catalogue {
    /// Payload lies (issue 18): every completion is well formed, only the bytes are
    /// wrong. The plain driver cannot see them (`.wrongPayload`, allowed by §1 and reported
    /// as undetected tampering); the verified layer must name each one
    /// (`PayloadProbe.expectedVerified`). Audited by `PayloadProbe`, not by `DriverProbe`:
    /// a payload lie needs a script that writes a block more than once.
    public static let payloadLies: [Attack] = [
        a(
            "payload-flip-bit", .payload, .r3, .completion, .payloadLie(.flipBit),
            "flips one bit of the data each read returns",
            must: "verified layer: refuse data whose tag does not authenticate", [.wrongPayload]),
        a(
            "payload-other-block", .payload, .r3, .completion, .payloadLie(.otherBlock),
            "answers each read with the bytes 9216 further on (another block's data)",
            must: "verified layer: refuse another block's data", [.wrongPayload]),
        a(
            "payload-older-version", .payload, .r3, .completion, .payloadLie(.olderVersion),
            "answers a read with what the range held before its latest write (an older version)",
            must: "verified layer: refuse an older version of the block", [.wrongPayload]),
        a(
            "payload-rollback", .payload, .r3, .completion, .payloadLie(.rollback),
            "keeps a snapshot of the whole disk at the first flush; after the second, serves every read from it",
            must: "verified layer: refuse a device rolled back to a snapshot", [.wrongPayload]),
        a(
            "payload-write-dropped", .payload, .r3, .completion, .payloadLie(.writeDropped),
            "acknowledges every write with status OK and stores nothing",
            must: "verified layer: refuse a read of a write that was never stored", [.wrongPayload]),
        a(
            "payload-torn-write", .payload, .r3, .completion, .payloadLie(.tornWrite),
            "stores every other write request and acknowledges all (a multi-block write lands in part)",
            must: "verified layer: refuse a multi-block write that landed in part", [.wrongPayload]),
    ]
}

extension AdversaryQueueHandler {
    /// The request's type and sector, read from the header in shared memory.
    func payloadHeader(_ chain: DescriptorChain) -> (type: UInt32, sector: UInt64) {
        var bytes: [UInt8] = []
        for s in chain.readable where bytes.count < 16 {
            bytes += UnsafeRawBufferPointer(s.buffer).prefix(16 - bytes.count)
        }
        guard bytes.count == 16 else { return (.max, 0) }
        var sector: UInt64 = 0
        for k in 0..<8 { sector |= UInt64(bytes[8 + k]) << (8 * UInt64(k)) }
        let type = UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
        return (type, sector)
    }

    func payloadEligible(_ lie: Behaviour.PayloadLie, _ chain: DescriptorChain) -> Bool {
        let (type, sector) = payloadHeader(chain)
        let read = type == BlockProtocol.RequestType.read.rawValue
        let write = type == BlockProtocol.RequestType.write.rawValue
        switch lie {
        case .flipBit, .otherBlock:
            // Whole blocks away from the superblock (the verified layer's data slots; the
            // plain driver's 4 KiB reads after the first).
            return read && chain.writableLength > 4096 && sector != 0
        case .olderVersion: return (read && chain.writableLength > 4096 && sector != 0) || write
        case .rollback: return read || type == BlockProtocol.RequestType.flush.rawValue
        case .writeDropped, .tornWrite: return write
        }
    }

    /// The data segments of a read (the writable bytes before the status byte).
    func scatterData(_ bytes: [UInt8]) {
        var done = 0
        let total = Int(chain.writableLength) - 1
        for s in chain.writable where done < total {
            let n = min(s.buffer.count, total - done, bytes.count - done)
            guard n > 0 else { break }
            for i in 0..<n { s.buffer[i] = bytes[done + i] }
            done += n
        }
    }

    func imageBytes(at offset: UInt64, count: Int) -> [UInt8]? {
        let image = inner.device.image
        guard count > 0, offset < image.size, UInt64(count) <= image.size - offset else { return nil }
        var b = [UInt8](repeating: 0, count: count)
        let ok = b.withUnsafeMutableBytes { image.read(into: $0, at: offset) }
        return ok ? b : nil
    }

    func payloadLie(_ lie: Behaviour.PayloadLie, _ queue: any DeviceRing) {
        let head = chain.head
        let (type, sector) = payloadHeader(chain)
        let offset = sector &* 512
        let dataIn = max(0, Int(chain.writableLength) - 1)
        let dataOut = max(0, Int(chain.readableLength) - 16)
        let isWrite = type == BlockProtocol.RequestType.write.rawValue
        let isFlush = type == BlockProtocol.RequestType.flush.rawValue
        let first = device.payload.withLock { m -> Bool in
            defer { m.noted = true }
            return !m.noted
        }
        if first { device.note("payload lie \(lie) from request \(device.observations.requests) on") }
        switch lie {
        case .flipBit:
            let length = inner.execute(chain)
            if let s = chain.writable.first, s.buffer.count > 100 { s.buffer[100] ^= 0x10 }
            queue.complete(head: head, length: length)
        case .otherBlock:
            let length = inner.execute(chain)
            if let other = imageBytes(at: offset &+ 9216, count: dataIn) { scatterData(other) }
            queue.complete(head: head, length: length)
        case .olderVersion:
            if isWrite, let old = imageBytes(at: offset, count: dataOut), old.contains(where: { $0 != 0 }) {
                device.payload.withLock { $0.replaced[sector] = old }
            }
            let length = inner.execute(chain)
            if !isWrite, let old = device.payload.withLock({ $0.replaced[sector] }), old.count >= dataIn {
                scatterData(Array(old.prefix(dataIn)))
            }
            queue.complete(head: head, length: length)
        case .rollback:
            let length = inner.execute(chain)
            if isFlush {
                let take = device.payload.withLock { m -> Bool in
                    m.flushes += 1
                    return m.flushes == 1
                }
                if take, let all = imageBytes(at: 0, count: Int(clamping: inner.device.image.size)) {
                    device.payload.withLock { $0.snapshot = all }
                }
            } else if let snap = device.payload.withLock({ $0.flushes >= 2 ? $0.snapshot : nil }),
                offset < UInt64(snap.count), UInt64(dataIn) <= UInt64(snap.count) - offset
            {
                scatterData(Array(snap[Int(offset)..<Int(offset) + dataIn]))
            }
            queue.complete(head: head, length: length)
        case .writeDropped:
            acknowledgeWithoutStoring(queue)
        case .tornWrite:
            let drop = device.payload.withLock { m -> Bool in
                m.writes += 1
                return m.writes % 2 == 0
            }
            if drop {
                acknowledgeWithoutStoring(queue)
            } else {
                queue.complete(head: head, length: inner.execute(chain))
            }
        }
    }

    /// Status OK, used length 1, nothing stored.
    func acknowledgeWithoutStoring(_ queue: any DeviceRing) {
        if let s = statusSegment { s[0] = BlockProtocol.Status.ok.rawValue }
        queue.complete(head: chain.head, length: 1)
    }
}
