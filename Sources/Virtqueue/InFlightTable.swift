/// What the driver posted, per head (split) or buffer id (packed): the private record the
/// R3 checks of a used element are made against. One table for both driver queues.
struct InFlightTable {
    struct Entry {
        var token: UInt64 = 0
        /// Device-writable bytes posted: the most a completion may claim.
        var writable: UInt64 = 0
        /// Descriptors (split) or ring slots (packed) the chain occupies; 1 when indirect.
        var count: UInt16 = 0
        /// Next free id while free (packed only; split heads come from the descriptor free list).
        var nextFree: UInt16 = 0
        var active = false
    }

    /// `size` entries (at least one), owned by the queue: freed by `deallocate()`.
    let entries: UnsafeMutablePointer<Entry>
    let size: Int

    init(size: Int) {
        self.size = size
        entries = .allocate(capacity: max(size, 1))
        entries.initialize(repeating: Entry(), count: max(size, 1))
        reset()
    }

    func deallocate() { entries.deallocate() }

    /// Nothing in flight; free ids linked in order.
    func reset() {
        for i in 0..<max(size, 1) { entries[i] = Entry(nextFree: UInt16(truncatingIfNeeded: i + 1)) }
    }

    /// Records a posted chain under a private id (`< size`).
    @inline(__always)
    func post(_ id: UInt16, token: UInt64, writable: UInt64, count: Int) {
        entries[Int(id)] = Entry(
            token: token, writable: writable, count: UInt16(truncatingIfNeeded: count), active: true)
    }

    /// R3 on a used element the device wrote: the id names a chain in flight and the length
    /// is at most what that chain offered. Returns the record; the caller breaks the queue
    /// on a throw.
    @inline(__always)
    func check(id untrustedID: UInt32, length untrustedLength: UInt32, queueSize: UInt16) throws(Violation) -> Entry {
        guard untrustedID < UInt32(truncatingIfNeeded: size) else {
            throw .usedIdOutOfRange(id: untrustedID, queueSize: queueSize)
        }
        let record = entries[Int(untrustedID)]
        guard record.active else { throw .usedIdNotInFlight(id: untrustedID) }
        guard UInt64(untrustedLength) <= record.writable else {
            throw .usedLengthTooLarge(id: untrustedID, length: untrustedLength, writable: record.writable)
        }
        return record
    }

    /// Ends the record of a checked id.
    @inline(__always)
    func complete(_ id: UInt16) { entries[Int(id)].active = false }

    /// Pushes a checked, completed id onto a free-id list headed by `freeHead`.
    @inline(__always)
    func free(_ id: UInt16, freeHead: inout UInt16) {
        entries[Int(id)].nextFree = freeHead
        freeHead = id
    }

    /// After the queue broke: the tokens of every record in flight, which end here.
    func failAll() -> [UInt64] {
        var tokens: [UInt64] = []
        for i in 0..<size where entries[i].active {
            tokens.append(entries[i].token)
            entries[i].active = false
        }
        return tokens
    }

    /// Tokens in flight, by id.
    var tokens: [UInt64] { (0..<size).compactMap { entries[$0].active ? entries[$0].token : nil } }
}
