#if canImport(Glibc)
import Glibc
#endif
public import SharedMemory

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
    /// Slots of the ring (32 for one page).
    public let ringSize: Int
    let mask: UInt32
    let ring: UnsafeMutableRawPointer
    /// Maps the frontend's grants (checking each entry once, R2).
    public let mapper: GrantMapper
    /// The disk served.
    public let storage: any BlockStorage
    let scratch: UnsafeMutableRawPointer
    /// A multi-segment write's pieces, for one vectored write (private).
    let vectors: UnsafeMutableBufferPointer<iovec>

    @exclusivity(unchecked) var requestConsumer: UInt32 = 0
    @exclusivity(unchecked) var requestSnapshot: UInt32 = 0
    /// Responses written so far (private, R1); the next one goes to slot
    /// `responseProducer & mask`.
    @exclusivity(unchecked) public private(set) var responseProducer: UInt32 = 0
    @exclusivity(unchecked) var publishedResponseProducer: UInt32 = 0

    /// The Adversary's hook points (nil in service).
    @exclusivity(unchecked) public var hooks: (any XenBackendHooks)?
    @exclusivity(unchecked) public private(set) var rejectedRequests = 0
    @exclusivity(unchecked) public private(set) var lastRejection: XenViolation?
    /// Rejected requests by the rule each broke (for an operator's metrics).
    @exclusivity(unchecked) public private(set) var rejectionsByRule: [Rule: Int] = [:]
    @exclusivity(unchecked) public private(set) var servedRequests = 0
    /// Bytes of successful reads and writes (for an operator's metrics).
    @exclusivity(unchecked) public private(set) var bytesRead = 0
    @exclusivity(unchecked) public private(set) var bytesWritten = 0

    /// A backend on the shared ring page `ring`, mapping grants with `mapper`, serving `storage`.
    public init(ring: UnsafeMutableRawPointer, mapper: GrantMapper, storage: any BlockStorage) {
        self.ring = ring
        self.mapper = mapper
        self.storage = storage
        ringSize = BlkifLayout.ringSize
        mask = UInt32(ringSize - 1)
        scratch = UnsafeMutableRawPointer.allocate(byteCount: BlkifLayout.requestSize, alignment: 8)
        vectors = .allocate(capacity: BlkifLayout.maxSegments)
        vectors.initialize(repeating: iovec())
    }

    deinit {
        scratch.deallocate()
        vectors.deallocate()
    }

    /// Handles up to `budget` requests. Throws only for ring-level corruption, after
    /// which the connection must be dropped.
    public func serve(budget: Int) throws(XenViolation) -> Int {
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
            do throws(XenViolation) {
                status = try execute(operation: operation, id: id)
            } catch {
                rejectedRequests += 1
                lastRejection = error
                rejectionsByRule[error.rule, default: 0] += 1
                status = .error
            }
            servedRequests += 1
            var response = BlkResponseFields(id: id, operation: operation, status: status.rawValue)
            let copies = hooks?.willRespond(&response) ?? 1
            for _ in 0..<max(0, copies) { respond(response) }
        }
        return handled
    }

    /// Validates the private copy in `scratch`, then does the I/O.
    func execute(operation: UInt8, id: UInt64) throws(XenViolation) -> BlkStatus {
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
            let write = operation == BlkOperation.write.rawValue
            let status = try transfer(write: write, count: Int(count), sector: sector)
            if status == .okay {
                if write {
                    bytesWritten &+= Int(total) * BlkifLayout.sectorSize
                } else {
                    bytesRead &+= Int(total) * BlkifLayout.sectorSize
                }
            }
            return status
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

    func checkCapacity(id: UInt64, sector: UInt64, sectors: UInt64) throws(XenViolation) {
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
    func transfer(write: Bool, count: Int, sector: UInt64) throws(XenViolation) -> BlkStatus {
        // A disk write reads the frontend's page; a disk read writes into it.
        let pageWrite = !write
        var mapped = 0
        defer {
            if hooks?.shouldUnmapGrants(self, segments: mapped) ?? true {
                for s in 0..<mapped { mapper.unmap(ref(s), write: pageWrite) }
            }
            hooks?.didEndTransfer(self, segments: mapped)
        }
        if write && count > 1 {
            // The segments are contiguous on disk: map them all (all or nothing), then one
            // vectored write. Segment bounds come from the private copy (checked, R2/R3).
            for s in 0..<count {
                let page = try mapper.map(ref(s), write: pageWrite)
                mapped += 1
                let (first, last) = segmentSectors(s)
                vectors[s] = iovec(
                    iov_base: page + Int(first) * BlkifLayout.sectorSize,
                    iov_len: (Int(last) - Int(first) + 1) * BlkifLayout.sectorSize)
            }
            let pieces = UnsafeMutableBufferPointer(rebasing: vectors[0..<count])
            return storage.write(sector: sector, vectors: pieces) ? .okay : .error
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

    /// Grant ref of segment `s` of the request being served (its private copy).
    @inline(__always)
    public func ref(_ s: Int) -> UInt32 {
        scratch.loadUnaligned(
            fromByteOffset: BlkifLayout.segments + s * BlkifLayout.segmentSize + BlkifLayout.segmentGrantRef,
            as: UInt32.self)
    }

    /// The shared slot of response `index` (wrapped into the ring).
    public func responseSlot(_ index: UInt32) -> UnsafeMutableRawPointer {
        ring + SharedRingLayout.headerSize + Int(index & mask) * BlkifLayout.slotSize
    }

    /// Writes one response into the next slot (write-only, R1).
    func respond(_ response: BlkResponseFields) {
        let slot = responseSlot(responseProducer)
        var words: (UInt64, UInt64) = (
            response.id, UInt64(response.operation) | UInt64(UInt16(bitPattern: response.status)) << 16
        )
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
        if let hooks { new = hooks.willPublish(responseProducer: new, previous: publishedResponseProducer) }
        SharedAccess.store32Release(ring + SharedRingLayout.responseProducer, new)
        hooks?.didPublish(self)
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
