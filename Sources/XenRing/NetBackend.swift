import SharedMemory

/// A frame the backend took off the tx ring, in private memory (valid until the next
/// call of `serveTx`).
public struct NetTxFrame {
    public let bytes: UnsafeRawBufferPointer
    public let gso: NetGSO?
}

/// What became of a frame offered to the frontend on the rx ring.
public enum NetSendResult: Equatable, Sendable {
    case sent(slots: Int)
    /// Not enough rx requests posted: the frame is not sent (the caller drops or queues it).
    case noBuffers
    /// A granted page could not be mapped: the slots were answered NETIF_RSP_ERROR.
    case failed(XenViolation)
    /// Frames are 1...65535 bytes.
    case invalidLength(Int)
}

/// The hardened netif backend on one tx and one rx ring ("netback without trusting
/// netfront").
///
/// - R2: req_prod is loaded once per batch; each request (and extra-info segment) is
///   copied whole into private memory before any field is looked at.
/// - R3/R5: req_prod may not overflow the ring; a frame is at most `maxSlotsPerFrame`
///   slots, wholly published, its extra-info types known (one each), GSO fields valid,
///   every slot's `offset + size` within its page. Any of these drops the connection
///   (Linux's `xenvif_fatal_tx_err`); a frame whose sizes do not add up or whose grants
///   cannot be mapped is answered NETIF_RSP_ERROR and the backend keeps serving.
/// - R1: responses are written, never read back; rsp_prod and its notify decision come
///   from private state.
public final class NetBackend {
    struct TxSlot {
        var ref: UInt32 = 0
        var offset: UInt16 = 0
        var id: UInt16 = 0
        var size: UInt16 = 0
        /// An extra-info segment: answered NETIF_RSP_NULL.
        var isExtra = false
    }

    public let mapper: GrantMapper
    let txRing: UnsafeMutableRawPointer
    let rxRing: UnsafeMutableRawPointer
    let txMask = UInt32(NetifLayout.txRingSize - 1)
    let rxMask = UInt32(NetifLayout.rxRingSize - 1)
    /// The frame being assembled (private, R7: never mapped into the peer).
    let frame: UnsafeMutableRawPointer
    let chain: PrivateTable<TxSlot>

    @exclusivity(unchecked) var txConsumer: UInt32 = 0
    @exclusivity(unchecked) var txSnapshot: UInt32 = 0
    @exclusivity(unchecked) public private(set) var txResponseProducer: UInt32 = 0
    @exclusivity(unchecked) var txPublished: UInt32 = 0
    @exclusivity(unchecked) var rxConsumer: UInt32 = 0
    @exclusivity(unchecked) var rxSnapshot: UInt32 = 0
    @exclusivity(unchecked) public private(set) var rxResponseProducer: UInt32 = 0
    @exclusivity(unchecked) var rxPublished: UInt32 = 0

    /// The Adversary's hook points (nil in service).
    @exclusivity(unchecked) public var hooks: (any XenNetBackendHooks)? {
        didSet { hooked = hooks != nil }
    }
    /// `hooks != nil` as one byte, for the hot path.
    @exclusivity(unchecked) var hooked = false
    @exclusivity(unchecked) public private(set) var rejectedFrames = 0
    @exclusivity(unchecked) public private(set) var lastRejection: XenViolation?
    @exclusivity(unchecked) public private(set) var txFrames = 0
    @exclusivity(unchecked) public private(set) var rxFrames = 0
    /// Bytes of the frames sent into rx pages.
    @exclusivity(unchecked) public private(set) var rxBytes = 0
    /// Rejected frames by the rule they broke ("R3": n).
    @exclusivity(unchecked) public private(set) var rejectionsByRule: [String: Int] = [:]

    public init(txRing: UnsafeMutableRawPointer, rxRing: UnsafeMutableRawPointer, mapper: GrantMapper) {
        self.txRing = txRing
        self.rxRing = rxRing
        self.mapper = mapper
        frame = .allocate(byteCount: NetifLayout.maxFrameSize, alignment: 64)
        chain = PrivateTable(repeating: TxSlot(), count: NetifLayout.maxSlotsPerFrame + NetifLayout.maxExtras)
    }

    deinit { frame.deallocate() }

    // MARK: tx (frontend → backend)

    /// Takes up to `budget` frames off the tx ring, hands each good one to `deliver` and
    /// answers every slot. Throws only for what drops the connection.
    public func serveTx(budget: Int, deliver: (NetTxFrame) -> Void) throws(XenViolation) -> Int {
        var handled = 0
        while handled < budget {
            if txConsumer == txSnapshot {
                let producer = SharedAccess.load32Acquire(txRing + SharedRingLayout.requestProducer)
                if producer == txConsumer { break }
                // RING_REQUEST_PROD_OVERFLOW (also catches a producer that went backwards).
                guard producer &- txResponseProducer <= UInt32(NetifLayout.txRingSize) else {
                    throw .xenRequestProducerOverflow(
                        consumer: txConsumer, producer: producer, ringSize: NetifLayout.txRingSize)
                }
                txSnapshot = producer
            }
            let (count, gso) = try takeTxChain()
            let sizes = try checkSizes(count)
            handled += 1
            var status = NetStatus.okay
            do throws(XenViolation) {
                let (first, firstBytes) = try sizes.get()
                let length = try assemble(count, first: first, firstBytes: firstBytes)
                deliver(NetTxFrame(bytes: UnsafeRawBufferPointer(start: frame, count: length), gso: gso))
                txFrames += 1
            } catch {
                rejectedFrames += 1
                rejectionsByRule[error.rule.rawValue, default: 0] += 1
                lastRejection = error
                status = .error
            }
            for k in 0..<count {
                let slot = chain[k]
                respondTx(id: slot.id, status: slot.isExtra ? .null : status)
            }
        }
        return handled
    }

    /// Copies the next frame's requests (first, extra info, more_data) into `chain`,
    /// checking the structure; returns the slot count and the GSO segment.
    func takeTxChain() throws(XenViolation) -> (Int, NetGSO?) {
        var count = 0
        var dataSlots = 0
        var extras = 0
        var seen: UInt8 = 0
        var gso: NetGSO?
        var flags = NetFlags.txMoreData
        var expectExtras = false
        while flags & NetFlags.txMoreData != 0 || expectExtras {
            guard txConsumer != txSnapshot else { throw .xenNetChainIncomplete(slots: count) }
            let slot = txRing + SharedRingLayout.headerSize + Int(txConsumer & txMask) * NetifLayout.txSlotSize
            // The whole 12-byte slot, once (R2).
            let w0 = SharedAccess.load32(slot)
            let w1 = SharedAccess.load32(slot + 4)
            let w2 = SharedAccess.load32(slot + 8)
            txConsumer &+= 1
            if expectExtras {
                extras += 1
                guard extras <= NetifLayout.maxExtras else { throw .xenNetExtraInfoChain(count: extras) }
                let type = UInt8(truncatingIfNeeded: w0)
                let extraFlags = UInt8(truncatingIfNeeded: w0 >> 8)
                guard type > NetExtraType.none.rawValue, type < NetExtraType.max.rawValue else {
                    throw .xenNetExtraInfoType(type: type)
                }
                guard seen & (1 << type) == 0 else { throw .xenNetExtraInfoChain(count: extras) }
                seen |= 1 << type
                if type == NetExtraType.gso.rawValue {
                    let size = UInt16(truncatingIfNeeded: w0 >> 16)
                    let rawType = UInt8(truncatingIfNeeded: w1)
                    guard size > 0, let gsoType = NetGSOType(rawValue: rawType) else {
                        throw .xenNetGSOField(type: rawType, size: size)
                    }
                    gso = NetGSO(type: gsoType, size: size)
                }
                chain[count] = TxSlot(id: 0, isExtra: true)
                count += 1
                expectExtras = extraFlags & NetFlags.extraMore != 0
                continue
            }
            dataSlots += 1
            guard dataSlots <= NetifLayout.maxSlotsPerFrame else {
                throw .xenNetChainTooLong(slots: dataSlots, limit: NetifLayout.maxSlotsPerFrame)
            }
            let offset = UInt16(truncatingIfNeeded: w1)
            flags = UInt16(truncatingIfNeeded: w1 >> 16)
            let id = UInt16(truncatingIfNeeded: w2)
            let size = UInt16(truncatingIfNeeded: w2 >> 16)
            chain[count] = TxSlot(ref: w0, offset: offset, id: id, size: size)
            count += 1
            if dataSlots == 1 && flags & NetFlags.txExtraInfo != 0 { expectExtras = true }
        }
        return (count, gso)
    }

    /// The sizes of the chain in `chain`: the first slot's size is the frame's, the
    /// others' its fragments'. A slot whose `offset + size` crosses its page drops the
    /// connection (thrown); sizes that do not add up (or a runt frame) fail this frame
    /// only (`.failure`). Returns the first data slot and its byte count.
    func checkSizes(_ count: Int) throws(XenViolation) -> Result<(first: Int, bytes: Int), XenViolation> {
        var first = -1
        var fragments = 0
        for k in 0..<count where !chain[k].isExtra {
            if first < 0 {
                first = k
            } else {
                let slot = chain[k]
                guard Int(slot.offset) + Int(slot.size) <= SharedRingLayout.pageSize else {
                    throw .xenNetRequestSize(id: slot.id, offset: slot.offset, size: slot.size)
                }
                fragments += Int(slot.size)
            }
        }
        guard first >= 0 else { throw .xenNetChainIncomplete(slots: count) }
        let head = chain[first]
        let total = Int(head.size)
        guard fragments <= total, total >= NetifLayout.minimumFrameSize else {
            return .failure(.xenNetRequestSize(id: head.id, offset: head.offset, size: head.size))
        }
        let bytes = total - fragments
        guard Int(head.offset) + bytes <= SharedRingLayout.pageSize else {
            throw .xenNetRequestSize(id: head.id, offset: head.offset, size: UInt16(truncatingIfNeeded: bytes))
        }
        return .success((first, bytes))
    }

    /// Maps each data slot's grant in turn and copies the frame into `frame` (private).
    func assemble(_ count: Int, first: Int, firstBytes: Int) throws(XenViolation) -> Int {
        var length = 0
        for k in first..<count where !chain[k].isExtra {
            let slot = chain[k]
            let bytes = k == first ? firstBytes : Int(slot.size)
            let page = try mapper.map(slot.ref, write: false)
            SharedAccess.copy(from: page + Int(slot.offset), to: frame + length, count: bytes)
            if !hooked || hooks?.shouldUnmapGrant(self, ref: slot.ref) ?? true { mapper.unmap(slot.ref, write: false) }
            length += bytes
        }
        return length
    }

    func respondTx(id: UInt16, status: NetStatus) {
        var response = NetTxResponseFields(id: id, status: status.rawValue)
        let copies = hooked ? hooks?.willRespondTx(&response) ?? 1 : 1
        for _ in 0..<max(0, copies) {
            let slot =
                txRing + SharedRingLayout.headerSize + Int(txResponseProducer & txMask) * NetifLayout.txSlotSize
            SharedAccess.store32(slot, UInt32(response.id) | UInt32(UInt16(bitPattern: response.status)) << 16)
            txResponseProducer &+= 1
        }
    }

    // MARK: rx (backend → frontend)

    /// Sends one frame into the frontend's posted rx pages, 4 KiB a slot with more_data,
    /// a GSO extra-info slot after the first when given. Needs every slot posted first
    /// (whole frames only, as netback). Throws only for what drops the connection.
    public func send(_ data: UnsafeRawBufferPointer, gso: NetGSO? = nil) throws(XenViolation) -> NetSendResult {
        var gso = gso
        if hooked { hooks?.willSendRx(gso: &gso) }
        let count = data.count
        guard count > 0, count <= NetifLayout.maxFrameSize, let source = data.baseAddress else {
            return .invalidLength(count)
        }
        let page = SharedRingLayout.pageSize
        let dataSlots = (count + page - 1) / page
        let needed = UInt32(dataSlots + (gso == nil ? 0 : 1))
        if rxSnapshot &- rxConsumer < needed {
            let producer = SharedAccess.load32Acquire(rxRing + SharedRingLayout.requestProducer)
            guard producer &- rxResponseProducer <= UInt32(NetifLayout.rxRingSize) else {
                throw .xenRequestProducerOverflow(
                    consumer: rxConsumer, producer: producer, ringSize: NetifLayout.rxRingSize)
            }
            rxSnapshot = producer
            if rxSnapshot &- rxConsumer < needed { return .noBuffers }
        }
        var failure: XenViolation?
        var offset = 0
        for s in 0..<dataSlots {
            let request = SharedAccess.load64(rxSlot(rxConsumer))  // one copy (R2)
            rxConsumer &+= 1
            let id = UInt16(truncatingIfNeeded: request)
            let ref = UInt32(truncatingIfNeeded: request >> 32)
            let bytes = min(page, count - offset)
            var status = Int16(bytes)
            do throws(XenViolation) {
                let target = try mapper.map(ref, write: true)
                target.copyMemory(from: source + offset, byteCount: bytes)
                if !hooked || hooks?.shouldUnmapGrant(self, ref: ref) ?? true { mapper.unmap(ref, write: true) }
            } catch {
                failure = failure ?? error
                status = NetStatus.error.rawValue
            }
            var flags: UInt16 = s < dataSlots - 1 ? NetFlags.rxMoreData : 0
            if s == 0 && gso != nil { flags |= NetFlags.rxExtraInfo }
            respondRx(NetRxResponseFields(id: id, offset: 0, flags: flags, status: status))
            if s == 0, let gso {
                rxConsumer &+= 1  // the extra segment uses up a posted request, unread
                var extra =
                    UInt64(NetExtraType.gso.rawValue) | UInt64(gso.size) << 16 | UInt64(gso.type.rawValue) << 32
                hooks?.willWriteRxExtra(&extra)
                writeRxResponse(extra)
            }
            offset += bytes
        }
        if let failure {
            rejectedFrames += 1
            rejectionsByRule[failure.rule.rawValue, default: 0] += 1
            lastRejection = failure
            return .failed(failure)
        }
        rxFrames += 1
        rxBytes += count
        return .sent(slots: Int(needed))
    }

    @inline(__always)
    func rxSlot(_ position: UInt32) -> UnsafeMutableRawPointer {
        rxRing + SharedRingLayout.headerSize + Int(position & rxMask) * NetifLayout.rxSlotSize
    }

    func respondRx(_ fields: NetRxResponseFields) {
        var response = fields
        let copies = hooked ? hooks?.willRespondRx(&response) ?? 1 : 1
        for _ in 0..<max(0, copies) {
            writeRxResponse(
                UInt64(response.id) | UInt64(response.offset) << 16 | UInt64(response.flags) << 32
                    | UInt64(UInt16(bitPattern: response.status)) << 48)
        }
    }

    func writeRxResponse(_ word: UInt64) {
        SharedAccess.store64(rxSlot(rxResponseProducer), word)
        rxResponseProducer &+= 1
    }

    // MARK: publishing, notifications

    /// Publishes both rsp_prods; true if the frontend asked for an event on either. The
    /// decision uses the private last-published values, never rsp_prod read back (R1).
    public func publishResponses() -> Bool {
        var notify = false
        if txResponseProducer != txPublished {
            let new =
                hooks?.willPublish(rx: false, responseProducer: txResponseProducer, previous: txPublished)
                ?? txResponseProducer
            notify = Self.publish(txRing, new, previous: txPublished) || notify
            txPublished = txResponseProducer
        }
        if rxResponseProducer != rxPublished {
            let new =
                hooks?.willPublish(rx: true, responseProducer: rxResponseProducer, previous: rxPublished)
                ?? rxResponseProducer
            notify = Self.publish(rxRing, new, previous: rxPublished) || notify
            rxPublished = rxResponseProducer
        }
        return notify
    }

    static func publish(_ ring: UnsafeMutableRawPointer, _ new: UInt32, previous old: UInt32) -> Bool {
        SharedAccess.store32Release(ring + SharedRingLayout.responseProducer, new)
        SharedAccess.fullFence()
        let event = SharedAccess.load32(ring + SharedRingLayout.responseEvent)
        return new &- event < new &- old
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS on the tx ring: true if frames are waiting;
    /// otherwise asks for an event at the next one.
    public func enableNotifications() -> Bool {
        if txConsumer != txSnapshot { return true }
        if SharedAccess.load32Acquire(txRing + SharedRingLayout.requestProducer) != txConsumer { return true }
        SharedAccess.store32(txRing + SharedRingLayout.requestEvent, txConsumer &+ 1)
        // rx: an event when the frontend posts buffers, so queued frames can go out.
        SharedAccess.store32(rxRing + SharedRingLayout.requestEvent, rxSnapshot &+ 1)
        SharedAccess.fullFence()
        return SharedAccess.load32Acquire(txRing + SharedRingLayout.requestProducer) != txConsumer
    }
}
