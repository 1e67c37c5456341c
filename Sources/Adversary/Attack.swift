public import SharedMemory
public import Virtqueue

/// The families of misbehaviour the catalogue covers (issue 5's list, one per row).
public enum AttackGroup: String, Sendable, CaseIterable, Codable {
    /// Used-ring corruption.
    case usedRing = "used ring"
    /// Values rewritten between check and use.
    case toctou = "time of check / time of use"
    /// Shared memory overwritten outside the rings.
    case vandalism = "shared-memory vandalism"
    /// Bad virtio-blk payloads.
    case payload = "blk payload"
    /// Bad config space.
    case config = "config space"
    /// vhost-user control-plane attacks.
    case controlPlane = "control plane"
    /// Silence, storms and slowness.
    case liveness = "liveness"
    /// Attacks on the driver's shared memory.
    case memory = "memory"
    /// Searches shared memory for the driver's private data.
    case leak = "leak probe"
    /// Packed-ring misbehaviour (issue 7): only with VIRTIO_F_RING_PACKED negotiated.
    case packedRing = "packed ring"
    /// Descriptors the driver shares with the device: flags and counters of its eventfds,
    /// and what the device attaches to replies (issue 13).
    case sharedDescriptors = "shared descriptors"
}

/// The device-side seam an attack acts through (docs/design.md §3: the Adversary is data plus
/// hooks into the real back-end, never a second device implementation).
public enum HookPoint: String, Sendable, Codable {
    /// `QueueHandler.serve`: when and how a popped chain is completed.
    case completion
    /// `QueueHandler.beforePublish` and the first look at the ring after a publish.
    case afterPublish = "after publish"
    /// A thread of the adversary's own, racing the driver.
    case thread
    /// `VhostUserDevice.readConfig`.
    case config
    /// `ControlReplyHook.willSend` (and the offered feature bits).
    case controlReply = "control reply"
    /// `VhostUserDevice.controlRequestReceived`: fds and addresses the driver announced.
    case controlRequest = "control request"
    /// `QueueHandler.idle`: the kick wait timed out.
    case timer
}

/// What a hardened driver must do, as a signature the audit compares: a violation case
/// name (`usedIdOutOfRange`), or one of the plain outcomes below.
public enum Signature: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The request failed with this `Violation` case; the device is broken (R6).
    case violation(String)
    /// The request did not complete within its deadline (R5).
    case timeout
    /// The back-end went away; in-flight requests failed.
    case disconnected
    /// Refused at negotiation: the device lacks something required.
    case unsupported
    /// The device answered IOERR: a plain error, the device stays usable.
    case deviceError
    /// The attack changed nothing the driver relies on: every request succeeded with
    /// the right bytes (R1: it never reads back what it wrote; R2: single fetch; clamps).
    case unaffected
    /// Requests succeeded but returned wrong payload bytes. Allowed by the threat model
    /// (integrity above the transport is the caller's job), reported all the same.
    case wrongPayload
    /// Failed with a local error (system call, refused request): reported as is.
    case otherError
    /// Nothing was tested: the attack needs a ring format the driver did not negotiate
    /// (a packed-ring attack against a driver that acked the split ring). Never a pass.
    case notApplicable

    /// The signature as the report prints it.
    public var description: String {
        switch self {
        case .violation(let name): return "violation \(name)"
        case .timeout: return "timeout"
        case .disconnected: return "disconnected"
        case .unsupported: return "unsupported"
        case .deviceError: return "device error"
        case .unaffected: return "unaffected"
        case .wrongPayload: return "wrong payload"
        case .otherError: return "other error"
        case .notApplicable: return "not applicable"
        }
    }

    /// The case name of a violation (`usedIdOutOfRange`), independent of its values.
    public static func name(of violation: any RuleViolation) -> String {
        if let label = Mirror(reflecting: violation).children.first?.label { return label }
        return "\(violation)"
    }
}

/// One named misbehaviour: what it does, which rule of docs/design.md it tests, what a
/// hardened driver must do about it, and where it hooks into the device side.
public struct Attack: Sendable, Hashable, Identifiable, CustomStringConvertible {
    /// The catalogue name (`ringfence audit --only NAME`).
    public let name: String
    /// What the attack goes after.
    public let group: AttackGroup
    /// The rule a driver must enforce to contain it.
    public let rule: Rule
    /// Where in the real device the attack acts.
    public let hook: HookPoint
    /// One line: what the device does.
    public let summary: String
    /// One line: what a hardened driver must do.
    public let expectation: String
    /// Outcomes that count as contained for our driver. Usually one; a race (TOCTOU) may
    /// legitimately end either way, and each way is still contained.
    public let expected: Set<Signature>
    /// Requests served correctly before the attack starts (`--attack-after` default).
    public let defaultAfter: Int
    /// The ring format the attack is written against. The adversary offers
    /// VIRTIO_F_RING_PACKED only for `.packed` attacks (and then needs the driver to ack
    /// it, or the attack is not applicable); every other attack sees a split ring.
    public let ring: RingFormat
    let behaviour: Behaviour

    /// The name.
    public var id: String { name }
    /// The name.
    public var description: String { name }

    /// Attacks are identified by name.
    public static func == (a: Attack, b: Attack) -> Bool { a.name == b.name }
    /// Hashes the name.
    public func hash(into h: inout Hasher) { h.combine(name) }
}
