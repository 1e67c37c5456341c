import SharedMemory
public import Virtqueue

/// The hardened blkif backend on one Xen PV ring ("blkback without trusting blkfront").
///
/// - R2: req_prod is loaded once per batch, each request copied whole into private
///   memory (RING_COPY_REQUEST) before any field is looked at.
/// - R3: req_prod may not overflow the ring (RING_REQUEST_PROD_OVERFLOW) — that drops
///   the connection; a bad request (segments, sector ranges, grants, capacity) is
///   answered BLKIF_RSP_ERROR and the backend keeps serving.
/// - R1: responses are written, never read back; rsp_prod and its notify decision come
///   from private state.
public final class BlkBackend {
    public let ringSize: Int
    let mask: UInt32
    let ring: UnsafeMutableRawPointer
    public let mapper: GrantMapper
    public let storage: any BlockStorage
    let scratch: UnsafeMutableRawPointer

    @exclusivity(unchecked) var requestConsumer: UInt32 = 0
    @exclusivity(unchecked) var requestSnapshot: UInt32 = 0
    @exclusivity(unchecked) var responseProducer: UInt32 = 0
    @exclusivity(unchecked) var publishedResponseProducer: UInt32 = 0

    /// Misbehaviour to apply (adversary runs only; nil in normal service).
    @exclusivity(unchecked) public var attack: XenBackendAttack?
    @exclusivity(unchecked) public private(set) var rejectedRequests = 0
    @exclusivity(unchecked) public private(set) var lastRejection: Violation?
    @exclusivity(unchecked) public private(set) var servedRequests = 0

    public init(ring: UnsafeMutableRawPointer, mapper: GrantMapper, storage: any BlockStorage) {
        self.ring = ring
        self.mapper = mapper
        self.storage = storage
        ringSize = BlkifLayout.ringSize
        mask = UInt32(ringSize - 1)
        scratch = UnsafeMutableRawPointer.allocate(byteCount: BlkifLayout.requestSize, alignment: 8)
    }

    deinit { scratch.deallocate() }

    /// Handles up to `budget` requests. Throws only for ring-level corruption, after
    /// which the connection must be dropped.
    public func serve(budget: Int) throws(Violation) -> Int {
        var handled = 0
        while handled < budget {
            if requestConsumer == requestSnapshot {
                let producer = SharedAccess.load32Acquire(ring + SharedRingLayout.requestProducer)
                if producer == requestConsumer { break }
                // RING_REQUEST_PROD_OVERFLOW: more unanswered requests than slots (also
                // catches a producer that went backwards).
                guard producer &- responseProducer <= UInt32(ringSize) else {
                    throw .xenRequestProducerOverflow(
                        consumer: requestConsumer, producer: producer, ringSize: ringSize)
                }
                requestSnapshot = producer
            }
            let slot = ring + SharedRingLayout.headerSize + Int(requestConsumer & mask) * BlkifLayout.slotSize
            scratch.copyMemory(from: slot, byteCount: BlkifLayout.requestSize)
            requestConsumer &+= 1
            handled += 1
            let operation = scratch.load(fromByteOffset: BlkifLayout.operation, as: UInt8.self)
            let id = scratch.loadUnaligned(fromByteOffset: BlkifLayout.id, as: UInt64.self)
            let status: BlkStatus
            do throws(Violation) {
                status = try execute(operation: operation, id: id)
            } catch {
                rejectedRequests += 1
                lastRejection = error
                status = .error
            }
            servedRequests += 1
            if attack == .neverRespond { continue }
            respond(id: id, operation: operation, status: status)
            if attack == .duplicateResponse { respond(id: id, operation: operation, status: status) }
        }
        return handled
    }

    /// Validates the private copy in `scratch`, then does the I/O.
    func execute(operation: UInt8, id: UInt64) throws(Violation) -> BlkStatus {
        let count = scratch.load(fromByteOffset: BlkifLayout.segmentCount, as: UInt8.self)
        let sector = scratch.loadUnaligned(fromByteOffset: BlkifLayout.sectorNumber, as: UInt64.self)
        switch BlkOperation(rawValue: operation) {
        case .read?, .write?:
            guard count >= 1, Int(count) <= BlkifLayout.maxSegments else {
                throw .xenRequestSegmentCount(id: id, count: count)
            }
            var total: UInt64 = 0
            for s in 0..<Int(count) {
                let (first, last) = segmentSectors(s)
                guard first <= last, last < UInt8(BlkifLayout.sectorsPerPage) else {
                    throw .xenRequestSectorRange(id: id, segment: s, first: first, last: last)
                }
                total += UInt64(last - first) + 1
            }
            try checkCapacity(id: id, sector: sector, sectors: total)
            return try transfer(write: operation == BlkOperation.write.rawValue, count: Int(count), sector: sector)
        case .flush?:
            guard count == 0 else { throw .xenRequestSegmentCount(id: id, count: count) }
            return storage.flush() ? .okay : .error
        case .discard?:
            let sectors = scratch.loadUnaligned(fromByteOffset: BlkifLayout.discardSectorCount, as: UInt64.self)
            try checkCapacity(id: id, sector: sector, sectors: sectors)
            return storage.discard(sector: sector, sectors: sectors) ? .okay : .notSupported
        case nil:
            return .notSupported
        }
    }

    func checkCapacity(id: UInt64, sector: UInt64, sectors: UInt64) throws(Violation) {
        let (end, overflow) = sector.addingReportingOverflow(sectors)
        guard !overflow, end <= storage.sectorCount else {
            throw .xenSectorBeyondCapacity(id: id, sector: sector, count: sectors, capacity: storage.sectorCount)
        }
    }

    @inline(__always)
    func segmentSectors(_ s: Int) -> (UInt8, UInt8) {
        let base = BlkifLayout.segments + s * BlkifLayout.segmentSize
        return (
            scratch.load(fromByteOffset: base + BlkifLayout.segmentFirstSector, as: UInt8.self),
            scratch.load(fromByteOffset: base + BlkifLayout.segmentLastSector, as: UInt8.self)
        )
    }

    /// Maps every segment's grant (all or nothing), copies, unmaps.
    func transfer(write: Bool, count: Int, sector: UInt64) throws(Violation) -> BlkStatus {
        // A disk write reads the frontend's page; a disk read writes into it.
        let pageWrite = !write
        var mapped = 0
        defer {
            if attack != .grantStillMapped {
                for s in 0..<mapped { mapper.unmap(ref(s), write: pageWrite) }
            }
            if attack == .grantFlagsScribbled {
                for s in 0..<mapped {
                    mapper.memory.flagsAtomicStore(ref(s), 0x00e2)
                }
            }
        }
        var position = sector
        var ok = true
        for s in 0..<count {
            let page = try mapper.map(ref(s), write: pageWrite)
            mapped += 1
            let (first, last) = segmentSectors(s)
            let bytes = (Int(last) - Int(first) + 1) * BlkifLayout.sectorSize
            let p = page + Int(first) * BlkifLayout.sectorSize
            if write {
                ok = ok && storage.write(sector: position, from: p, bytes: bytes)
            } else {
                ok = ok && storage.read(sector: position, into: p, bytes: bytes)
            }
            position += UInt64(last - first) + 1
        }
        return ok ? .okay : .error
    }

    @inline(__always)
    func ref(_ s: Int) -> UInt32 {
        scratch.loadUnaligned(
            fromByteOffset: BlkifLayout.segments + s * BlkifLayout.segmentSize + BlkifLayout.segmentGrantRef,
            as: UInt32.self)
    }

    /// Writes one response into the next slot (write-only, R1).
    func respond(id: UInt64, operation: UInt8, status: BlkStatus) {
        var id = id
        var operation = operation
        var rawStatus = status.rawValue
        switch attack {
        case .responseIdOutOfRange?: id = 1000
        case .responseIdNotInFlight?: id = (id &+ 1) & UInt64(mask)
        case .wrongOperation?: operation ^= 1
        case .unknownStatus?: rawStatus = 7
        default: break
        }
        let slot = ring + SharedRingLayout.headerSize + Int(responseProducer & mask) * BlkifLayout.slotSize
        var words: (UInt64, UInt64) = (id, UInt64(operation) | UInt64(UInt16(bitPattern: rawStatus)) << 16)
        withUnsafeBytes(of: &words) {
            slot.copyMemory(from: $0.baseAddress ?? UnsafeRawPointer(slot), byteCount: BlkifLayout.responseSize)
        }
        responseProducer &+= 1
    }

    /// Publishes rsp_prod; true if the frontend asked for an event. The decision uses
    /// the private last-published value, never the old rsp_prod read back (R1).
    public func publishResponses() -> Bool {
        guard responseProducer != publishedResponseProducer else { return false }
        var new = responseProducer
        switch attack {
        case .responseProducerJump?: new = responseProducer &+ 1000
        case .responseProducerBackwards?: new = publishedResponseProducer &- 3
        default: break
        }
        SharedAccess.store32Release(ring + SharedRingLayout.responseProducer, new)
        if attack == .rewriteAfterPublish {
            let last = ring + SharedRingLayout.headerSize + Int((responseProducer &- 1) & mask) * BlkifLayout.slotSize
            SharedAccess.store64(last + BlkifLayout.responseId, 999)
        }
        SharedAccess.fullFence()
        let event = SharedAccess.load32(ring + SharedRingLayout.responseEvent)
        let old = publishedResponseProducer
        publishedResponseProducer = responseProducer
        return new &- event < new &- old
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS: true if requests are waiting; otherwise asks for an
    /// event at the next one (full fence, then re-check).
    public func enableNotifications() -> Bool {
        if requestConsumer != requestSnapshot { return true }
        if SharedAccess.load32Acquire(ring + SharedRingLayout.requestProducer) != requestConsumer { return true }
        SharedAccess.store32(ring + SharedRingLayout.requestEvent, requestConsumer &+ 1)
        SharedAccess.fullFence()
        return SharedAccess.load32Acquire(ring + SharedRingLayout.requestProducer) != requestConsumer
    }
}

extension GrantTableMemory {
    /// Raw flag store (adversary only: scribbling the frontend's grant entries).
    func flagsAtomicStore(_ ref: UInt32, _ value: UInt16) {
        guard Int(ref) < entryCount else { return }
        flagsAtomic(ref).store(value, ordering: .releasing)
    }
}
