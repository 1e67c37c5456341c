/// Backend misbehaviours the Xen frontend must survive (issue #6, "Bad input"), as data;
/// `XenBackendAdversary` plays them through the real backend's `XenBackendHooks`
/// (`serve-xen-blk --attack NAME`).
public enum XenBackendAttack: String, Sendable, CaseIterable {
    /// rsp_prod published far beyond the responses written (> ring size).
    case responseProducerJump = "rsp-prod-jump"
    /// rsp_prod published behind the previous value.
    case responseProducerBackwards = "rsp-prod-backwards"
    case responseIdOutOfRange = "rsp-id-out-of-range"
    /// A response for an id that was never posted.
    case responseIdNotInFlight = "rsp-id-not-in-flight"
    /// Every response written twice (the 2023 netback double-response case).
    case duplicateResponse = "duplicate-response"
    case wrongOperation = "wrong-operation"
    case unknownStatus = "unknown-status"
    /// The response slot rewritten (bad id) right after rsp_prod moved.
    case rewriteAfterPublish = "rewrite-after-publish"
    /// Grants left mapped (GTF_reading/GTF_writing set) when the response is sent.
    case grantStillMapped = "grant-still-mapped"
    /// Grant flags overwritten with garbage.
    case grantFlagsScribbled = "grant-flags-scribbled"
    /// Thousands of events without any response.
    case eventStorm = "event-storm"
    case sectorsZero = "sectors-zero"
    case sectorsHuge = "sectors-2^63"
    case sectorSizeThree = "sector-size-3"
    /// Consumes requests and never answers.
    case neverRespond = "never-respond"
}

/// Frontend misbehaviours the Xen backend must survive: the request is failed (ERROR)
/// or, for ring-level corruption, the connection is dropped; the backend keeps serving.
/// `XenFrontendAdversary` plays them through the real frontend's `XenFrontendHooks`
/// (`xen-blk audit`, verdict by `Auditor.auditXenBackend`).
public enum XenFrontendAttack: String, Sendable, CaseIterable {
    case requestProducerJump = "req-prod-jump"
    case tooManySegments = "segments-12"
    case firstAfterLast = "first-sect-after-last"
    case lastSectorBeyondPage = "last-sect-8"
    case grantRefOutOfRange = "gref-out-of-range"
    case grantNotGranted = "gref-not-granted"
    case sectorBeyondCapacity = "sector-beyond-capacity"
}
