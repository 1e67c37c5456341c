public import SharedMemory

/// The hardened device side of a packed virtqueue (virtio 1.x §2.8), the mirror of
/// `PackedDriverQueue`.
///
/// Each driver-written descriptor is read once: flags first (acquire), then addr, len, id
/// (R2). A chain is bounded by the slots the driver may still fill (R5); every slot of it
/// must carry the available mark of its lap; its buffer id must be in range and not in
/// flight (R3); every buffer is translated through `GuestMemory` (R7). A chain whose
/// extent is known but whose content is bad is `.rejected` (complete it, go on); a chain
/// whose extent or id is unusable breaks the queue.
public final class PackedDeviceQueue {
    public let queueSize: UInt16
    public let features: RingFeatures
    let size: Int
    let ring: UnsafeMutableRawPointer
    let driverArea: UnsafeMutableRawPointer
    let deviceArea: UnsafeMutableRawPointer
    public let indirectLimit: Int

    /// The private indices and counters. Behind an owned pointer, as in `DriverQueue`:
    /// stored `var`s of a class pay dynamic exclusivity checks on every access.
    struct State {
        /// Next slot to look at for an available chain, and its lap.
        var nextAvail: UInt16 = 0
        var availWrap = true
        /// Next slot to write a used descriptor into, and its lap.
        var usedIndex: UInt16 = 0
        var usedWrap = true
        /// Slots popped and not yet completed.
        var outstanding = 0
        /// Flags of the first used descriptor since the last publish (written there).
        var pendingSlot: UInt16 = 0
        var pendingFlags: UInt16 = 0
        var hasPending = false
        var usedSincePublish: UInt16 = 0
        var broken = false
    }

    let state: UnsafeMutablePointer<State>
    /// Per buffer id: ring slots of the chain in flight (0: not in flight). `size` entries;
    /// indexed only by ids already checked `< size`.
    let chainSlots: UnsafeMutablePointer<UInt16>

    public var nextAvail: UInt16 { state.pointee.nextAvail }
    public var availWrap: Bool { state.pointee.availWrap }
    public var usedIndex: UInt16 { state.pointee.usedIndex }
    public var usedWrap: Bool { state.pointee.usedWrap }

    public private(set) var violation: Violation?
    public var isBroken: Bool { state.pointee.broken }

    /// Sets up a queue on a ring announced by guest addresses (descriptor ring, driver
    /// area, device area). `base` is the vring base (`PackedLayout.decodeBase`).
    public convenience init(
        queueSize: Int, ringAddress: UInt64, driverAreaAddress: UInt64, deviceAreaAddress: UInt64,
        features: RingFeatures, memory: GuestMemory, base: UInt32 = 0x8000_8000, indirectLimit: Int? = nil
    ) throws(RingSetupError) {
        try self.init(
            queueSize: queueSize, features: features, base: base,
            translate: { (a, l) throws(TranslationError) in try memory.translate(a, length: l) },
            addresses: (ringAddress, driverAreaAddress, deviceAreaAddress), indirectLimit: indirectLimit)
    }

    /// The same, for rings announced by vhost-user "user" addresses.
    public convenience init(
        queueSize: Int, userRingAddress: UInt64, userDriverAreaAddress: UInt64, userDeviceAreaAddress: UInt64,
        features: RingFeatures, memory: GuestMemory, base: UInt32 = 0x8000_8000, indirectLimit: Int? = nil
    ) throws(RingSetupError) {
        try self.init(
            queueSize: queueSize, features: features, base: base,
            translate: { (a, l) throws(TranslationError) in try memory.translateUser(a, length: l) },
            addresses: (userRingAddress, userDriverAreaAddress, userDeviceAreaAddress), indirectLimit: indirectLimit)
    }

    init(
        queueSize: Int, features: RingFeatures, base: UInt32,
        translate: (UInt64, UInt64) throws(TranslationError) -> UnsafeMutableRawBufferPointer,
        addresses: (UInt64, UInt64, UInt64), indirectLimit: Int?
    ) throws(RingSetupError) {
        guard PackedLayout.isValidQueueSize(queueSize) else { throw .invalidQueueSize(queueSize) }
        func part(_ name: String, _ address: UInt64, _ size: Int, _ align: UInt64) throws(RingSetupError)
            -> UnsafeMutableRawPointer
        {
            try translateRingPart(name, address: address, size: size, alignment: align, translate: translate)
        }
        ring = try part("descriptor ring", addresses.0, PackedLayout.ringSize(queueSize), 16)
        driverArea = try part("driver area", addresses.1, PackedLayout.eventAreaSize, 4)
        deviceArea = try part("device area", addresses.2, PackedLayout.eventAreaSize, 4)
        self.queueSize = UInt16(truncatingIfNeeded: queueSize)
        self.size = queueSize
        self.features = features
        self.indirectLimit = max(queueSize, min(indirectLimit ?? 0, PackedLayout.maximumQueueSize))
        let b = PackedLayout.decodeBase(base)
        // A base outside the ring is clamped to its start (it only positions our reads).
        state = .allocate(capacity: 1)
        state.initialize(
            to: State(
                nextAvail: Int(b.avail) < queueSize ? b.avail : 0, availWrap: b.availWrap,
                usedIndex: Int(b.used) < queueSize ? b.used : 0, usedWrap: b.usedWrap))
        chainSlots = .allocate(capacity: queueSize)
        chainSlots.initialize(repeating: 0, count: queueSize)
    }

    deinit {
        state.deallocate()
        chainSlots.deallocate()
    }

    /// What GET_VRING_BASE reports (QEMU's encoding, wrap counters in bits 15 and 31).
    public var vringBase: UInt32 {
        PackedLayout.encodeBase(avail: nextAvail, availWrap: availWrap, used: usedIndex, usedWrap: usedWrap)
    }

    @inline(__always)
    func descriptor(_ slot: Int) -> UnsafeMutableRawPointer { ring + slot * PackedLayout.descriptorSize }

    private func fail(_ v: Violation) -> Violation {
        if violation == nil {
            violation = v
            state.pointee.broken = true
        }
        return violation ?? v
    }

    /// Pops the next available chain into `chain`, validating it completely. `chain.head`
    /// is the buffer id (what `complete(head:length:)` takes).
    public func nextChain(into chain: inout DescriptorChain, memory: GuestMemory) throws(Violation) -> ChainFetch {
        if state.pointee.broken, let violation { throw violation }
        let start = state.pointee.nextAvail
        var slot = Int(start)
        var wrap = state.pointee.availWrap
        var untrustedFlags = SharedAccess.load16Acquire(descriptor(slot) + PackedLayout.descFlags)
        let mark = untrustedFlags & (PackedLayout.flagAvail | PackedLayout.flagUsed)
        if mark != PackedLayout.availableMarker(wrap: wrap) {
            if mark == PackedLayout.usedMarker(wrap: wrap) {
                throw fail(.packedAvailFlagsInvalid(slot: start, flags: untrustedFlags))
            }
            return .empty
        }
        // The driver may fill only the slots it got back: more is an overrun.
        let limit = size - state.pointee.outstanding
        guard limit > 0 else { throw fail(.packedAvailFlagsInvalid(slot: start, flags: untrustedFlags)) }
        chain.reset(head: 0)
        var count = 0
        var rejection: Violation?
        var sawWritable = false
        var total: UInt64 = 0
        var untrustedID: UInt16 = 0
        while true {
            count += 1
            guard count <= limit else { throw fail(.chainTooLong(head: start, limit: limit)) }
            let d = descriptor(slot)
            if count > 1 {
                untrustedFlags = SharedAccess.load16Acquire(d + PackedLayout.descFlags)
                guard
                    untrustedFlags & (PackedLayout.flagAvail | PackedLayout.flagUsed)
                        == PackedLayout.availableMarker(wrap: wrap)
                else { throw fail(.packedChainIncomplete(slot: UInt16(truncatingIfNeeded: slot))) }
            }
            // One load per field, into locals; never looked at again (R2).
            let untrustedAddress = SharedAccess.load64(d + PackedLayout.descAddr)
            let untrustedLength = SharedAccess.load32(d + PackedLayout.descLen)
            untrustedID = SharedAccess.load16(d + PackedLayout.descID)
            if rejection == nil {
                rejection = append(
                    address: untrustedAddress, length: untrustedLength, flags: untrustedFlags,
                    head: start, into: &chain, memory: memory, sawWritable: &sawWritable, total: &total)
            }
            slot += 1
            if slot == size {
                slot = 0
                wrap.toggle()
            }
            if untrustedFlags & PackedLayout.flagNext == 0 { break }
        }
        // The buffer id sits in the last descriptor.
        guard Int(untrustedID) < size else {
            throw fail(.packedBufferIdOutOfRange(id: untrustedID, queueSize: queueSize))
        }
        let id = untrustedID
        guard chainSlots[Int(id)] == 0 else { throw fail(.packedBufferIdInFlight(id: id)) }
        chainSlots[Int(id)] = UInt16(truncatingIfNeeded: count)
        state.pointee.outstanding += count
        state.pointee.nextAvail = UInt16(truncatingIfNeeded: slot)
        state.pointee.availWrap = wrap
        chain.head = id
        if let rejection { return .rejected(head: id, rejection) }
        return .ready
    }

    /// Checks and translates one ring descriptor (an indirect one: its whole table).
    /// `head` in the violations is the slot the chain starts at.
    private func append(
        address untrustedAddress: UInt64, length untrustedLength: UInt32, flags untrustedFlags: UInt16,
        head: UInt16, into chain: inout DescriptorChain, memory: GuestMemory, sawWritable: inout Bool,
        total: inout UInt64
    ) -> Violation? {
        guard untrustedFlags & PackedLayout.flagIndirect != 0 else {
            return appendBuffer(
                address: untrustedAddress, length: untrustedLength,
                writable: untrustedFlags & PackedLayout.flagWrite != 0, head: head, into: &chain,
                memory: memory, sawWritable: &sawWritable, total: &total)
        }
        guard features.indirectDescriptors else { return .indirectNotNegotiated(head: head) }
        guard untrustedFlags & PackedLayout.flagNext == 0 else { return .indirectWithNext(head: head) }
        let entries = Int(untrustedLength) / PackedLayout.descriptorSize
        guard untrustedLength != 0, untrustedLength % 16 == 0, entries <= indirectLimit else {
            return .indirectTableLength(head: head, length: untrustedLength)
        }
        let table: UnsafeMutableRawBufferPointer
        do {
            table = try memory.translate(untrustedAddress, length: UInt64(untrustedLength))
        } catch {
            return .descriptorAddressInvalid(head: head, error)
        }
        guard let base = table.baseAddress else { return .indirectTableLength(head: head, length: untrustedLength) }
        for i in 0..<entries {
            let e = base + i * PackedLayout.descriptorSize
            let address = SharedAccess.load64Unaligned(e + PackedLayout.descAddr)
            let length = SharedAccess.load32Unaligned(e + PackedLayout.descLen)
            let flags = SharedAccess.load16Unaligned(e + PackedLayout.descFlags)
            // Only WRITE is meaningful in an indirect table; a nested table is refused.
            guard flags & PackedLayout.flagIndirect == 0 else { return .nestedIndirect(head: head) }
            if let v = appendBuffer(
                address: address, length: length, writable: flags & PackedLayout.flagWrite != 0, head: head,
                into: &chain, memory: memory, sawWritable: &sawWritable, total: &total)
            {
                return v
            }
        }
        return nil
    }

    private func appendBuffer(
        address: UInt64, length untrustedLength: UInt32, writable: Bool, head: UInt16,
        into chain: inout DescriptorChain, memory: GuestMemory, sawWritable: inout Bool, total: inout UInt64
    ) -> Violation? {
        if writable {
            sawWritable = true
        } else if sawWritable {
            return .readableAfterWritable(head: head)
        }
        let length = UInt64(untrustedLength)
        total += length  // <= (32768 + 32768) descriptors * 2^32: cannot overflow
        guard total <= UInt64(UInt32.max) else { return .chainLengthOverflow(head: head) }
        guard !address.addingReportingOverflow(length).overflow else {
            return .descriptorAddressInvalid(head: head, .overflow(address: address, length: length))
        }
        // Straddling adjacent regions: one piece per region, at most maximumRegions (R5).
        var pieceAddress = address
        var remaining = length
        repeat {
            let piece: UnsafeMutableRawBufferPointer
            do {
                piece = try memory.translatePrefix(pieceAddress, length: remaining)
            } catch {
                return .descriptorAddressInvalid(head: head, .unmapped(address: address, length: length))
            }
            chain.segments.append(ChainSegment(buffer: piece, guestAddress: pieceAddress, deviceWritable: writable))
            pieceAddress &+= UInt64(piece.count)
            remaining -= UInt64(piece.count)
        } while remaining > 0
        if writable {
            chain.writableLength += length
        } else {
            chain.readableLength += length
            chain.firstWritable = chain.segments.count
        }
        return nil
    }

    /// Records that buffer `id` is done with `length` bytes written: one used descriptor,
    /// then the used position skips the chain's slots. Visible at `publishUsed()`.
    public func complete(head id: UInt16, length: UInt32) {
        var slots = 1
        if Int(id) < size, chainSlots[Int(id)] != 0 {
            slots = Int(chainSlots[Int(id)])
            chainSlots[Int(id)] = 0
            state.pointee.outstanding -= slots
        }
        let usedIndex = state.pointee.usedIndex
        var usedWrap = state.pointee.usedWrap
        let d = descriptor(Int(usedIndex))
        SharedAccess.store32(d + PackedLayout.descLen, length)
        SharedAccess.store16(d + PackedLayout.descID, id)
        let flags = PackedLayout.usedMarker(wrap: usedWrap) | (length > 0 ? PackedLayout.flagWrite : 0)
        if state.pointee.hasPending {
            SharedAccess.store16Release(d + PackedLayout.descFlags, flags)
        } else {
            state.pointee.pendingSlot = usedIndex
            state.pointee.pendingFlags = flags
            state.pointee.hasPending = true
        }
        var next = Int(usedIndex) + slots
        if next >= size {
            next -= size
            usedWrap.toggle()
        }
        state.pointee.usedIndex = UInt16(truncatingIfNeeded: next)
        state.pointee.usedWrap = usedWrap
        state.pointee.usedSincePublish &+= UInt16(truncatingIfNeeded: slots)
    }

    /// Publishes completions and says whether the driver wants an interrupt. The driver
    /// area is read once, as one 32-bit snapshot, after a full fence; garbage there
    /// breaks the queue (R3) but the interrupt is still sent.
    public func publishUsed() -> Bool {
        guard state.pointee.hasPending else { return false }
        SharedAccess.store16Release(
            descriptor(Int(state.pointee.pendingSlot)) + PackedLayout.descFlags, state.pointee.pendingFlags)
        state.pointee.hasPending = false
        let new = state.pointee.usedIndex
        let old = new &- state.pointee.usedSincePublish
        state.pointee.usedSincePublish = 0
        SharedAccess.fullFence()
        let snapshot = SharedAccess.load32(driverArea)
        let flags = UInt16(truncatingIfNeeded: snapshot >> 16)
        let offWrap = UInt16(truncatingIfNeeded: snapshot)
        switch flags {
        case PackedLayout.eventFlagEnable: return true
        case PackedLayout.eventFlagDisable: return false
        case PackedLayout.eventFlagDescriptor where features.eventIndex && Int(offWrap & 0x7fff) < size:
            return PackedLayout.needEvent(
                offWrap: offWrap, wrap: state.pointee.usedWrap, new: new, old: old, size: queueSize)
        default:
            _ = fail(.packedEventSuppressionInvalid(flags: flags, offWrap: offWrap, queueSize: queueSize))
            return true
        }
    }

    /// Asks the driver not to kick (a hint).
    public func disableNotifications() {
        SharedAccess.store16(deviceArea + PackedLayout.eventFlags, PackedLayout.eventFlagDisable)
    }

    /// Asks for a kick at the next available slot. Returns true if work may already be
    /// available (poll again before sleeping).
    public func enableNotifications() -> Bool {
        if features.eventIndex {
            SharedAccess.store16(
                deviceArea + PackedLayout.eventOffWrap, nextAvail | (availWrap ? PackedLayout.eventWrapBit : 0))
            SharedAccess.store16(deviceArea + PackedLayout.eventFlags, PackedLayout.eventFlagDescriptor)
        } else {
            SharedAccess.store16(deviceArea + PackedLayout.eventFlags, PackedLayout.eventFlagEnable)
        }
        SharedAccess.fullFence()
        let flags = SharedAccess.load16Acquire(descriptor(Int(nextAvail)) + PackedLayout.descFlags)
        return flags & (PackedLayout.flagAvail | PackedLayout.flagUsed) == PackedLayout.availableMarker(wrap: availWrap)
    }

    /// Breaks the queue on behalf of a caller (a device-level protocol violation).
    public func breakQueue(_ v: Violation) {
        _ = fail(v)
    }
}
