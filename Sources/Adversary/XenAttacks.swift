/// Backend misbehaviours the Xen frontend must survive (issue #6, "Bad input"), as data;
/// `XenBackendAdversary` plays them through the real backend's `XenBackendHooks`
/// (`serve-xen-blk --attack NAME`).
public enum XenBackendAttack: String, Sendable, CaseIterable {
    /// rsp_prod published far beyond the responses written (> ring size).
    case responseProducerJump = "rsp-prod-jump"
    /// rsp_prod published behind the previous value.
    case responseProducerBackwards = "rsp-prod-backwards"
    /// A response id outside the ring.
    case responseIdOutOfRange = "rsp-id-out-of-range"
    /// A response for an id that was never posted.
    case responseIdNotInFlight = "rsp-id-not-in-flight"
    /// Every response written twice (the 2023 netback double-response case).
    case duplicateResponse = "duplicate-response"
    /// A response whose operation does not echo the request's.
    case wrongOperation = "wrong-operation"
    /// A response status outside OKAY, ERROR, EOPNOTSUPP.
    case unknownStatus = "unknown-status"
    /// The response slot rewritten (bad id) right after rsp_prod moved.
    case rewriteAfterPublish = "rewrite-after-publish"
    /// Grants left mapped (GTF_reading/GTF_writing set) when the response is sent.
    case grantStillMapped = "grant-still-mapped"
    /// Grant flags overwritten with garbage.
    case grantFlagsScribbled = "grant-flags-scribbled"
    /// Thousands of events without any response.
    case eventStorm = "event-storm"
    /// Announces a disk of 0 sectors.
    case sectorsZero = "sectors-zero"
    /// Announces 2^63 sectors.
    case sectorsHuge = "sectors-2^63"
    /// Announces a sector size of 3.
    case sectorSizeThree = "sector-size-3"
    /// Consumes requests and never answers.
    case neverRespond = "never-respond"
}

/// Frontend misbehaviours the Xen backend must survive: the request is failed (ERROR)
/// or, for ring-level corruption, the connection is dropped; the backend keeps serving.
/// `XenFrontendAdversary` plays them through the real frontend's `XenFrontendHooks`
/// (`xen-blk audit`, verdict by `Auditor.auditXenBackend`).
public enum XenFrontendAttack: String, Sendable, CaseIterable {
    /// req_prod published far beyond the requests written.
    case requestProducerJump = "req-prod-jump"
    /// A request with 12 segments (at most 11).
    case tooManySegments = "segments-12"
    /// A segment whose first sector is after its last.
    case firstAfterLast = "first-sect-after-last"
    /// A segment ending at sector 8 of a 4 KiB page.
    case lastSectorBeyondPage = "last-sect-8"
    /// A grant ref beyond the table.
    case grantRefOutOfRange = "gref-out-of-range"
    /// A grant ref that was never granted.
    case grantNotGranted = "gref-not-granted"
    /// A request beyond the disk's end.
    case sectorBeyondCapacity = "sector-beyond-capacity"
}
