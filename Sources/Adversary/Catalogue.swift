import SharedMemory
import VhostUser
import Virtqueue

/// How an attack misbehaves, interpreted by `AdversaryDevice` at its hook point.
enum Behaviour: Sendable, Hashable {
    // used ring
    case usedIdOutOfRange
    case usedIdNotInFlight
    case duplicateCompletion
    case usedIndexJump
    case usedIndexBackwards
    case usedLength(LengthLie)
    // TOCTOU
    case rewriteUsedAfterPublish
    case rewriteFromThread(RaceTarget)
    // vandalism
    case scribbleDescriptors
    case scribbleAvail
    case scribbleBounce
    // payload
    case status(UInt8)
    case statusNotWritten
    case identifierWithoutNul
    // config
    case config(ConfigLie)
    // control plane
    case reply(ReplyLie, Request)
    case withoutVersion1
    case unofferedFeatures
    // liveness
    case neverComplete
    case completeLate(seconds: Double)
    case closeMidIO
    case notificationStorm(calls: Int)
    case ignoreKicks
    // shared descriptors (issue 13): the driver's eventfds share their open file
    // description with us, so we can clear O_NONBLOCK and fill or empty the counter
    case callFDBlockingSaturated
    case callFDBlockingEmptied
    case kickFDBlockingSaturated
    // a control socket's pace
    case requestsNeverRead
    case repliesJustInTime(seconds: Double)
    // memory
    case resizeMemfd
    case mapBeyondRegion
    case leakProbe
    // packed ring
    case packed(PackedLie)
    // payload lies (issue 18): well-formed completions carrying wrong bytes
    case payloadLie(PayloadLie)

    enum LengthLie: Sendable, Hashable { case overflow, zero, statusOnly }
    /// What a lying back-end returns or stores instead of the truth (`PayloadLies.swift`).
    enum PayloadLie: Sendable, Hashable {
        case flipBit, otherBlock, olderVersion, rollback, writeDropped, tornWrite
    }
    /// Packed-ring lies that need raw ring bytes or a particular order of completions.
    enum PackedLie: Sendable, Hashable {
        /// A used descriptor whose AVAIL/USED bits carry the other lap's wrap counter.
        case wrongWrapCounter
        /// A buffer id below the queue size that the driver never posted.
        case idNeverPosted
        /// The same buffer id completed twice in one batch.
        case duplicateID
        /// A used mark in the slot after the last completion (never made available).
        case usedSlotNotAvailable
        /// The device event suppression area, written just before a publish.
        case eventSuppression(EventLie)
        /// Each used descriptor rewritten once the driver has read it.
        case rewriteAfterRead
    }
    enum EventLie: Sendable, Hashable {
        /// flags = 3 (reserved), off_wrap 0.
        case reservedFlags
        /// flags = DESC, off_wrap = wrap bit | queue size (one past the last slot).
        case offsetBeyondRing
    }
    enum RaceTarget: Sendable, Hashable { case status, data }
    enum ReplyLie: Sendable, Hashable {
        case wrongCode, short, oversized, hugeSize, withDescriptor, withPipe, withMemfd, nack, never
    }
    enum ConfigLie: Sendable, Hashable {
        case capacity(UInt64)
        case blockSize(UInt32)
        case segMax(UInt32)
        case numQueues(UInt16)
        /// A different capacity and block size on every read.
        case flapping
    }
}

/// The catalogue: every misbehaviour RingFence can aim at a driver, as data.
public enum Catalogue {
    /// The attack called `name`, if any.
    public static func attack(named name: String) -> Attack? { all.first { $0.name == name } }

    /// Names in catalogue order.
    public static var names: [String] { all.map(\.name) }

    /// Resolves a comma-separated `--only` list; unknown names are returned as the error.
    public static func select(_ names: [String]) -> Result<[Attack], UnknownAttack> {
        var picked: [Attack] = []
        for n in names.flatMap({ $0.split(separator: ",") }).map(String.init) where !n.isEmpty {
            guard let a = attack(named: n) else { return .failure(UnknownAttack(name: n)) }
            picked.append(a)
        }
        return .success(picked)
    }

    /// A name that is not in the catalogue.
    public struct UnknownAttack: Error, CustomStringConvertible {
        /// The unknown name.
        public let name: String
        /// One line pointing to `ringfence audit --list`.
        public var description: String { "unknown attack '\(name)' (see `ringfence audit --list`)" }
    }

    static func a(
        _ name: String, _ group: AttackGroup, _ rule: Rule, _ hook: HookPoint, _ behaviour: Behaviour,
        _ summary: String, must expectation: String, _ expected: Set<Signature>, after: Int = 0,
        ring: RingFormat = .split
    ) -> Attack {
        Attack(
            name: name, group: group, rule: rule, hook: hook, summary: summary, expectation: expectation,
            expected: expected, defaultAfter: after, ring: ring, behaviour: behaviour)
    }

    static func v(_ name: String) -> Signature { .violation(name) }

    /// Every attack, in report order.
    public static let all: [Attack] = [
        // used ring
        a(
            "used-id-out-of-range", .usedRing, .r3, .completion, .usedIdOutOfRange,
            "completes a request with used.id = queue size + 7",
            must: "fail the request: id outside the ring", [v("usedIdOutOfRange")]),
        a(
            "used-id-not-in-flight", .usedRing, .r3, .completion, .usedIdNotInFlight,
            "completes a descriptor index that is not the head of any request in flight",
            must: "fail the request: id not in flight", [v("usedIdNotInFlight")]),
        a(
            "duplicate-completion", .usedRing, .r3, .completion, .duplicateCompletion,
            "completes the same request twice in one batch",
            must: "refuse the second completion", [v("usedIndexBeyondInFlight"), v("usedIdNotInFlight")]),
        a(
            "used-idx-jump", .usedRing, .r3, .completion, .usedIndexJump,
            "advances used.idx by queue size + 1 for one request",
            must: "refuse an index beyond what is in flight", [v("usedIndexBeyondInFlight")]),
        a(
            "used-idx-backwards", .usedRing, .r3, .completion, .usedIndexBackwards,
            "moves used.idx back by one after a good completion",
            must: "refuse a producer index that goes backwards", [v("usedIndexWentBackwards")], after: 1),
        a(
            "used-len-overflow", .usedRing, .r3, .completion, .usedLength(.overflow),
            "reports 4096 bytes more than the driver posted",
            must: "refuse a length above the posted writable length", [v("usedLengthTooLarge")]),
        a(
            "used-len-zero", .usedRing, .r3, .completion, .usedLength(.zero),
            "reports used length 0 (not even the status byte)",
            must: "fail the request: status byte missing", [v("blockStatusMissing")]),
        // TOCTOU
        a(
            "toctou-used-entry", .toctou, .r2, .afterPublish, .rewriteUsedAfterPublish,
            "rewrites every used entry (id 0xdead, len 0xffffffff) right after each publish",
            must: "read each used entry once; a rewrite is either unseen or a named violation",
            [.unaffected, v("usedIdOutOfRange"), v("usedLengthTooLarge")]),
        a(
            "toctou-status", .toctou, .r2, .thread, .rewriteFromThread(.status),
            "a thread rewrites the status byte with 0x7f for 20 ms after each completion",
            must: "read the status once; never act on a later value",
            [.unaffected, v("blockStatusInvalid"), .wrongPayload]),
        a(
            "toctou-data", .toctou, .r2, .thread, .rewriteFromThread(.data),
            "a thread rewrites read data for 20 ms after each completion",
            must: "copy data once; wrong bytes are the caller's integrity problem, not a crash",
            [.unaffected, .wrongPayload, v("blockStatusInvalid")]),
        // vandalism
        a(
            "vandal-descriptors", .vandalism, .r1, .completion, .scribbleDescriptors,
            "fills the descriptor table with 0xff after popping each chain",
            must: "never use a descriptor read back (private shadow state; a post rewrites what differs)", [.unaffected]
        ),
        a(
            "vandal-avail", .vandalism, .r1, .completion, .scribbleAvail,
            "overwrites the consumed avail ring entry with 0xffff",
            must: "never read the avail ring back", [.unaffected]),
        a(
            "vandal-bounce", .vandalism, .r7, .completion, .scribbleBounce,
            "writes garbage into shared memory around each request's buffers",
            must: "read only the completed request's device-writable bytes", [.unaffected]),
        // payload
        a(
            "status-garbage", .payload, .r3, .completion, .status(0x7f),
            "answers status 0x7f",
            must: "refuse an unknown status", [v("blockStatusInvalid")]),
        a(
            "status-ioerr", .payload, .r3, .completion, .status(1),
            "answers VIRTIO_BLK_S_IOERR",
            must: "fail that request only; the device stays usable", [.deviceError]),
        a(
            "status-not-written", .payload, .r3, .completion, .statusNotWritten,
            "reports a plausible length but never writes the status byte",
            must: "see the sentinel it wrote, refuse it", [v("blockStatusInvalid")]),
        a(
            "short-read", .payload, .r3, .completion, .usedLength(.statusOnly),
            "completes a read with used length 1 (status OK, no data)",
            must: "refuse a successful read that returned less than asked", [v("blockShortRead")]),
        a(
            "get-id-without-nul", .payload, .r4, .completion, .identifierWithoutNul,
            "fills all 20 bytes of GET_ID, no terminating NUL",
            must: "bound the serial by the 20 bytes posted", [.unaffected]),
        // config
        a(
            "config-capacity-2^63", .config, .r3, .config, .config(.capacity(1 << 63)),
            "capacity of 2^63 sectors (byte size overflows)",
            must: "refuse the config at connect", [v("blockConfigInvalid")]),
        a(
            "config-blk-size-0", .config, .r3, .config, .config(.blockSize(0)),
            "blk_size 0", must: "refuse a block size that is not a power of two >= 512", [v("blockConfigInvalid")]),
        a(
            "config-blk-size-3", .config, .r3, .config, .config(.blockSize(3)),
            "blk_size 3", must: "refuse a block size that is not a power of two >= 512", [v("blockConfigInvalid")]),
        a(
            "config-blk-size-2^31", .config, .r3, .config, .config(.blockSize(1 << 31)),
            "blk_size 2^31", must: "refuse a block size above 64 KiB", [v("blockConfigInvalid")]),
        a(
            "config-seg-max-0", .config, .r3, .config, .config(.segMax(0)),
            "seg_max 0", must: "clamp to one segment and keep working", [.unaffected]),
        a(
            "config-num-queues-0", .config, .r3, .config, .config(.numQueues(0)),
            "num_queues 0", must: "clamp to one queue and keep working", [.unaffected]),
        a(
            "config-num-queues-65535", .config, .r3, .config, .config(.numQueues(65535)),
            "num_queues 65535", must: "clamp to GET_QUEUE_NUM and to what it asked for", [.unaffected]),
        a(
            "config-flapping", .config, .r2, .config, .config(.flapping),
            "returns a different capacity and block size on every config read",
            must: "read the config once and keep that geometry", [.unaffected]),
        // control plane
        a(
            "reply-wrong-code", .controlPlane, .r3, .controlReply, .reply(.wrongCode, .getProtocolFeatures),
            "answers GET_PROTOCOL_FEATURES with another request code",
            must: "refuse a reply to a request it did not send", [v("controlProtocol")]),
        a(
            "reply-short", .controlPlane, .r3, .controlReply, .reply(.short, .getFeatures),
            "answers GET_FEATURES with 4 bytes instead of 8",
            must: "refuse a payload of the wrong size", [v("controlProtocol")]),
        a(
            "reply-oversized", .controlPlane, .r3, .controlReply, .reply(.oversized, .getConfig),
            "answers GET_CONFIG with 8 bytes more than asked",
            must: "refuse a payload of the wrong size", [v("controlProtocol")]),
        a(
            "reply-size-0xffffff", .controlPlane, .r5, .controlReply, .reply(.hugeSize, .getQueueNum),
            "announces a 16 MiB reply to GET_QUEUE_NUM",
            must: "refuse the size before reading (no allocation, no wait)", [v("controlProtocol")]),
        a(
            "reply-with-fd", .controlPlane, .r3, .controlReply, .reply(.withDescriptor, .getFeatures),
            "attaches an eventfd to the GET_FEATURES reply",
            must: "close the descriptor and refuse the reply", [v("controlProtocol")]),
        a(
            "reply-nack", .controlPlane, .r3, .controlReply, .reply(.nack, .setMemTable),
            "answers SET_MEM_TABLE's REPLY_ACK with failure",
            must: "stop: the device has no memory", [v("controlProtocol")]),
        a(
            "reply-never", .controlPlane, .r5, .controlReply, .reply(.never, .getConfig),
            "never answers GET_CONFIG",
            must: "give up at the control deadline", [.timeout]),
        a(
            "no-version-1", .controlPlane, .r3, .controlReply, .withoutVersion1,
            "does not offer VIRTIO_F_VERSION_1 (legacy layout)",
            must: "refuse a legacy device", [.unsupported]),
        a(
            "unoffered-features", .controlPlane, .r3, .controlReply, .unofferedFeatures,
            "also offers ACCESS_PLATFORM and the undefined bits 50-63",
            must: "accept only the bits it implements", [.unaffected]),
        // liveness
        a(
            "never-complete", .liveness, .r5, .completion, .neverComplete,
            "takes requests and never completes them",
            must: "fail the request at its deadline, break the device", [.timeout]),
        a(
            "complete-after-deadline", .liveness, .r5, .timer, .completeLate(seconds: 3),
            "completes each request correctly, 3 s late",
            must: "time out, then ignore the late completion", [.timeout]),
        a(
            "close-mid-io", .liveness, .r6, .completion, .closeMidIO,
            "closes the vhost-user socket with a request in flight",
            must: "fail in-flight requests as disconnected, promptly", [.disconnected]),
        a(
            "notification-storm", .liveness, .r5, .completion, .notificationStorm(calls: 250_000),
            "signals the call eventfd 250 000 times, then completes",
            must: "count and back off spurious notifications; complete normally", [.unaffected]),
        a(
            "kick-ignored", .liveness, .r5, .completion, .ignoreKicks,
            "ignores every kick (the transport drains the eventfd; the ring is never read)",
            must: "fail the request at its deadline", [.timeout]),
        // shared descriptors
        a(
            "call-fd-blocking-saturated", .sharedDescriptors, .r5, .thread, .callFDBlockingSaturated,
            "after the first requests, clears O_NONBLOCK on the driver's call eventfd, fills its counter to the "
                + "maximum and stops completing",
            must: "time out at the deadline; never block writing or reading its own call eventfd", [.timeout],
            after: 4),
        a(
            "call-fd-blocking-emptied", .sharedDescriptors, .r5, .thread, .callFDBlockingEmptied,
            "clears O_NONBLOCK on the driver's call eventfd and empties the counter from a racing thread as soon as "
                + "it is signalled, while completing every request",
            must: "never block reading an emptied counter: find completions on the ring by the deadline",
            [.unaffected, .timeout]),
        a(
            "kick-fd-blocking-saturated", .sharedDescriptors, .r5, .thread, .kickFDBlockingSaturated,
            "after the first requests, clears O_NONBLOCK on the driver's kick eventfd, fills its counter to the "
                + "maximum and stops reading it",
            must: "free its blocked kick and fail the device (notifierBlocked), not hang", [v("notifierBlocked")],
            after: 4),
        a(
            "reply-with-pipe", .sharedDescriptors, .r3, .controlReply, .reply(.withPipe, .getFeatures),
            "attaches the write end of a pipe whose reader is gone to the GET_FEATURES reply (a write would SIGPIPE)",
            must: "close the descriptor and refuse the reply", [v("controlProtocol")]),
        a(
            "reply-with-memfd", .sharedDescriptors, .r3, .controlReply, .reply(.withMemfd, .getFeatures),
            "attaches a memfd (always readable, never an eventfd) to the GET_FEATURES reply",
            must: "close the descriptor and refuse the reply", [v("controlProtocol")]),
        a(
            "requests-never-read", .controlPlane, .r5, .controlRequest, .requestsNeverRead,
            "offers no REPLY_ACK, then stops reading the control socket after SET_PROTOCOL_FEATURES",
            must: "give up at the control deadline, sends included", [.timeout]),
        a(
            "replies-just-in-time", .controlPlane, .r5, .controlReply, .repliesJustInTime(seconds: 0.8),
            "answers every control message correctly, 0.8 s late (inside a 1 s per-message deadline)",
            must: "bound the whole connect, not each message: give up at the control deadline", [.timeout]),
        // memory
        a(
            "memfd-resize", .memory, .r7, .controlRequest, .resizeMemfd,
            "tries to shrink and grow the driver's memfd (a SIGBUS in the driver if it worked)",
            must: "seal the memfd (F_SEAL_SHRINK|GROW): both fail with EPERM", [.unaffected]),
        a(
            "map-beyond-region", .memory, .r7, .controlRequest, .mapBeyondRegion,
            "maps the memfd 1 MiB past the announced region and looks for driver bytes",
            must: "share a memfd that holds only the region", [.unaffected]),
        // leak probe
        a(
            "leak-probe", .leak, .r7, .timer, .leakProbe,
            "dumps all shared memory during and after I/O for the audit to search",
            must: "never expose private bytes (the canary); zero freed bounce memory", [.unaffected]),
        // packed ring (issue 7): the device offers VIRTIO_F_RING_PACKED for these only. Our
        // probe runs each round with two writes in flight and an idle poll after them.
        a(
            "packed-used-wrong-wrap", .packedRing, .r3, .completion, .packed(.wrongWrapCounter),
            "writes the used descriptor (right id and len) with AVAIL = USED = the other lap's wrap counter",
            must: "refuse a used mark of another lap", [v("packedUsedWrapCounter")], ring: .packed),
        a(
            "packed-used-id-out-of-range", .packedRing, .r3, .completion, .usedIdOutOfRange,
            "completes a request with buffer id = queue size + 7",
            must: "fail the request: id outside the ring", [v("usedIdOutOfRange")], ring: .packed),
        a(
            "packed-used-id-not-in-flight", .packedRing, .r3, .completion, .packed(.idNeverPosted),
            "completes a request with buffer id = queue size - 1, an id the driver never posted",
            must: "fail the request: id not in flight", [v("usedIdNotInFlight")], ring: .packed),
        a(
            "packed-duplicate-id", .packedRing, .r3, .completion, .packed(.duplicateID),
            "completes the first of two requests in flight twice in one batch (same buffer id)",
            must: "refuse the second completion: that id is no longer in flight (with one request in flight the "
                + "duplicate lands in the slot the driver fills next: only a poll before that can see it)",
            [v("usedIdNotInFlight")],
            ring: .packed),
        a(
            "packed-used-len-overflow", .packedRing, .r3, .completion, .usedLength(.overflow),
            "reports 4096 bytes more than the driver posted as device-writable",
            must: "refuse a length above the posted writable length", [v("usedLengthTooLarge")], ring: .packed),
        a(
            "packed-used-slot-not-available", .packedRing, .r3, .completion, .packed(.usedSlotNotAvailable),
            "after its completions, writes a used descriptor into the next slot, which the driver never made available",
            must: "refuse a used mark where nothing is in flight (seen when it polls then, as on the interrupt sent)",
            [v("packedUsedSlotNotAvailable")], ring: .packed),
        a(
            "packed-event-flags-3", .packedRing, .r3, .afterPublish, .packed(.eventSuppression(.reservedFlags)),
            "sets the device event suppression area to flags 3 (reserved) just before publishing a completion",
            must: "refuse the snapshot at its next publish", [v("packedEventSuppressionInvalid")], ring: .packed),
        a(
            "packed-event-offset-beyond-ring", .packedRing, .r3, .afterPublish,
            .packed(.eventSuppression(.offsetBeyondRing)),
            "sets the device event suppression area to DESC with off_wrap = queue size (one past the ring)",
            must: "refuse the snapshot at its next publish", [v("packedEventSuppressionInvalid")], ring: .packed),
        a(
            "packed-toctou-used-descriptor", .packedRing, .r2, .completion, .packed(.rewriteAfterRead),
            "rewrites every used descriptor (id 0xdead, len 0xffffffff) once the driver has read it",
            must: "read each used descriptor once and never again", [.unaffected], ring: .packed),
    ]
}
