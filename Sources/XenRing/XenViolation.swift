public import SharedMemory

/// What a Xen peer did that the rules forbid, seen by the frontend (about the backend's
/// responses, grants and handshake) or by the backend (about the frontend's requests).
/// The first one disables the device or drops the connection (R6).
public enum XenViolation: RuleViolation, Equatable {
    /// rsp_prod moved further than the requests in flight (or than the ring).
    case xenResponseProducerBeyondInFlight(consumer: UInt32, producer: UInt32, inFlight: Int)
    /// rsp_prod moved backwards.
    case xenResponseProducerWentBackwards(consumer: UInt32, producer: UInt32)
    /// A response id outside the shadow table.
    case xenResponseIdOutOfRange(id: UInt64, ringSize: Int)
    /// A response id that is not in flight (never posted, or completed already).
    case xenResponseIdNotInFlight(id: UInt64)
    /// A response whose operation does not echo its request's.
    case xenResponseOperationMismatch(id: UInt64, expected: UInt8, got: UInt8)
    /// A response status outside {OKAY, ERROR, EOPNOTSUPP}.
    case xenResponseStatusUnknown(id: UInt64, status: Int16)
    /// The backend still has a granted page mapped when the request completed.
    case xenGrantStillMapped(ref: UInt32, flags: UInt16)
    /// A grant entry's flags are not what the frontend wrote (nor what a mapping adds).
    case xenGrantFlagsScribbled(ref: UInt32, expected: UInt16, found: UInt16)
    /// A handshake (xenstore) value outside its sane range, or malformed.
    case xenHandshakeValue(key: String, value: String)
    /// The handshake did not follow Initialising → Initialised → Connected.
    case xenHandshakeState(expected: UInt8, got: UInt8)
    /// req_prod moved further than the ring can hold (RING_REQUEST_PROD_OVERFLOW).
    case xenRequestProducerOverflow(consumer: UInt32, producer: UInt32, ringSize: Int)
    /// A request with a segment count outside 1...11 (0 for flush/discard).
    case xenRequestSegmentCount(id: UInt64, count: UInt8)
    /// A segment with first_sect > last_sect or last_sect > 7.
    case xenRequestSectorRange(id: UInt64, segment: Int, first: UInt8, last: UInt8)
    /// A grant reference outside the grant table.
    case xenGrantRefOutOfRange(ref: UInt32, entries: Int)
    /// A grant reference that is not granted to us (or read-only where we must write).
    case xenGrantNotGranted(ref: UInt32, flags: UInt16)
    /// A request beyond the disk's capacity.
    case xenSectorBeyondCapacity(id: UInt64, sector: UInt64, count: UInt64, capacity: UInt64)
    /// The backend did not answer within the deadline.
    case deadlineExceeded(milliseconds: UInt64)
    /// The peer made a notification of ours block on a shared eventfd (cleared O_NONBLOCK
    /// and saturated the counter); the watchdog had to free it.
    case notifierBlocked(role: String)
    /// netif: an rx response id that is not the request posted at its ring position.
    case xenNetRxIdOutOfOrder(id: UInt16, expected: UInt16)
    /// netif: an rx response whose `offset + status` runs past its page.
    case xenNetRxOffsetBeyondPage(id: UInt16, offset: UInt16, size: Int16)
    /// netif: a status outside NETIF_RSP_{DROPPED,ERROR,OKAY,NULL} (tx) or below
    /// DROPPED (rx).
    case xenNetStatusUnknown(ring: String, id: UInt16, status: Int16)
    /// netif: a NETIF_RSP_NULL tx response with no extra-info slot outstanding.
    case xenNetUnexpectedNullResponse(position: UInt32)
    /// netif: an extra-info segment of a type this direction does not carry.
    case xenNetExtraInfoType(type: UInt8)
    /// netif: more extra-info segments than types, or one type twice.
    case xenNetExtraInfoChain(count: Int)
    /// netif: a GSO segment with a type or size the frame cannot have.
    case xenNetGSOField(type: UInt8, size: UInt16)
    /// netif: a more_data chain longer than a frame may be (or than the slots posted).
    case xenNetChainTooLong(slots: Int, limit: Int)
    /// netif: a frame's chain (more_data or extra info) runs past the published producer.
    case xenNetChainIncomplete(slots: Int)
    /// netif: a tx request whose offset and size do not fit its page, or whose sizes do
    /// not add up to the frame's (or a frame outside 14...65535 bytes).
    case xenNetRequestSize(id: UInt16, offset: UInt16, size: UInt16)

    public var rule: Rule {
        switch self {
        case .xenResponseProducerBeyondInFlight, .xenResponseProducerWentBackwards,
            .xenResponseIdOutOfRange, .xenResponseIdNotInFlight, .xenResponseOperationMismatch,
            .xenResponseStatusUnknown, .xenHandshakeValue, .xenHandshakeState,
            .xenRequestProducerOverflow, .xenRequestSegmentCount, .xenRequestSectorRange,
            .xenSectorBeyondCapacity, .xenGrantFlagsScribbled, .xenNetRxIdOutOfOrder, .xenNetRxOffsetBeyondPage,
            .xenNetStatusUnknown, .xenNetUnexpectedNullResponse, .xenNetExtraInfoType, .xenNetExtraInfoChain,
            .xenNetGSOField, .xenNetRequestSize:
            return .r3
        case .xenNetChainTooLong, .xenNetChainIncomplete: return .r5
        case .xenGrantStillMapped, .xenGrantRefOutOfRange, .xenGrantNotGranted: return .r7
        case .deadlineExceeded, .notifierBlocked: return .r5
        }
    }

    public var detail: String {
        switch self {
        case .xenResponseProducerBeyondInFlight(let c, let p, let n):
            return "rsp_prod jumped from \(c) to \(p) with only \(n) requests in flight"
        case .xenResponseProducerWentBackwards(let c, let p):
            return "rsp_prod went backwards from \(c) to \(p)"
        case .xenResponseIdOutOfRange(let id, let size):
            return "response id \(id) is outside the ring of \(size)"
        case .xenResponseIdNotInFlight(let id):
            return "response id \(id) is not in flight"
        case .xenResponseOperationMismatch(let id, let expected, let got):
            return "response \(id) echoes operation \(got), request was \(expected)"
        case .xenResponseStatusUnknown(let id, let status):
            return "response \(id) has unknown status \(status)"
        case .xenGrantStillMapped(let ref, let flags):
            return "grant \(ref) still mapped at completion (flags 0x\(String(flags, radix: 16))); page quarantined"
        case .xenGrantFlagsScribbled(let ref, let expected, let found):
            return
                "grant \(ref) flags 0x\(String(found, radix: 16)), expected 0x\(String(expected, radix: 16)); page quarantined"
        case .xenHandshakeValue(let key, let value):
            return "handshake value \(key)=\(value) is out of range"
        case .xenHandshakeState(let expected, let got):
            return "handshake state \(got), expected \(expected)"
        case .xenRequestProducerOverflow(let c, let p, let size):
            return "req_prod jumped from \(c) to \(p), more than the ring of \(size)"
        case .xenRequestSegmentCount(let id, let n):
            return "request \(id) has \(n) segments"
        case .xenRequestSectorRange(let id, let seg, let first, let last):
            return "request \(id) segment \(seg): sectors \(first)...\(last) do not fit a page"
        case .xenGrantRefOutOfRange(let ref, let n):
            return "grant ref \(ref) is outside the table of \(n) entries"
        case .xenGrantNotGranted(let ref, let flags):
            return "grant ref \(ref) is not granted for this access (flags 0x\(String(flags, radix: 16)))"
        case .xenSectorBeyondCapacity(let id, let sector, let count, let cap):
            return "request \(id): sectors \(sector)+\(count) beyond capacity \(cap)"
        case .deadlineExceeded(let ms):
            return "device did not complete within \(ms) ms"
        case .notifierBlocked(let role):
            return "the peer made a write to the shared \(role) eventfd block (O_NONBLOCK cleared, counter saturated)"
        case .xenNetRxIdOutOfOrder(let id, let expected):
            return "rx response id \(id) answers the slot of id \(expected)"
        case .xenNetRxOffsetBeyondPage(let id, let offset, let size):
            return "rx response \(id): offset \(offset) + size \(size) runs past the page"
        case .xenNetStatusUnknown(let ring, let id, let status):
            return "\(ring) response \(id) has unknown status \(status)"
        case .xenNetUnexpectedNullResponse(let position):
            return "tx response \(position) is NETIF_RSP_NULL with no extra-info slot outstanding"
        case .xenNetExtraInfoType(let type):
            return "extra-info type \(type) is not valid here"
        case .xenNetExtraInfoChain(let n):
            return "extra-info chain of \(n) segments (at most one per type)"
        case .xenNetGSOField(let type, let size):
            return "GSO segment type \(type) size \(size) is invalid"
        case .xenNetChainTooLong(let slots, let limit):
            return "frame chain of \(slots) slots, limit \(limit)"
        case .xenNetChainIncomplete(let slots):
            return "frame chain of \(slots) slots runs past the published producer"
        case .xenNetRequestSize(let id, let offset, let size):
            return "tx request \(id): offset \(offset) size \(size) does not fit"
        }
    }
}
