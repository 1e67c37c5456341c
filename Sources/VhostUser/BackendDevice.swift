public import SharedMemory
public import Virtqueue

/// A device class served by `Backend` (virtio-blk, later net/fs, or an adversary wrapping
/// one). The back-end owns the transport (socket, memory table, rings, threads); the
/// device owns only semantics, so either side can be replaced or wrapped.
public protocol VhostUserDevice: AnyObject, Sendable {
    /// Virtio feature bits offered (device and ring bits, VERSION_1 included). The
    /// back-end adds VHOST_USER_F_PROTOCOL_FEATURES itself.
    var features: UInt64 { get }
    /// Protocol features the device needs on top of the transport's (e.g. `.config`).
    var protocolFeatures: ProtocolFeatures { get }
    /// Queues the device serves (GET_QUEUE_NUM; indexes above are refused).
    var queueCount: Int { get }
    /// Longest descriptor chain the device's config lets a driver build (virtio-blk:
    /// `seg_max` + 2). Indirect tables up to this length are accepted even on a smaller
    /// ring, because Linux sizes them by `seg_max`, not by the ring. 0: the ring size.
    var maximumChainLength: Int { get }

    /// GET_CONFIG: `size` bytes of config space from `offset`, or nil to refuse.
    /// (Hook point: an adversary returns hostile config here.)
    func readConfig(offset: UInt32, size: Int) -> [UInt8]?
    /// SET_CONFIG: returns whether the write was accepted.
    func writeConfig(offset: UInt32, bytes: [UInt8]) -> Bool

    /// A handler for one started queue. Called on the control thread; the handler is then
    /// used only by that queue's thread until the queue stops.
    func makeQueueHandler(queue: Int, features: UInt64) -> any QueueHandler

    /// The front-end went away (or reset the device): drop per-connection state.
    func frontendDisconnected()

    /// A well-formed request arrived, before the back-end acts on it. Descriptors are
    /// lent (dup what must outlive the call). Hook point: an adversary learns ring
    /// addresses and the call/memory fds here; the blk device ignores it.
    func controlRequestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32])
}

/// Serves one virtqueue; runs on that queue's own thread.
///
/// The worker calls `serve`, then `beforePublish`, then publishes used.idx and signals
/// the call fd if the driver wants it; `idle` runs when a wait timed out. Those three are
/// the hook points a misbehaving device (the Adversary) overrides.
public protocol QueueHandler: AnyObject {
    /// Pops and completes at most `budget` chains. Every popped chain must be completed
    /// (also the rejected ones) so GET_VRING_BASE can report a consistent index.
    /// Throws when the queue itself is broken (the worker then fails the queue).
    func serve(_ queue: any DeviceRing, memory: GuestMemory, budget: Int) throws(Violation) -> Int

    /// After completions were recorded, before used.idx is published.
    func beforePublish(_ queue: any DeviceRing, memory: GuestMemory)

    /// The kick wait timed out (a timer, about once per `Backend.Configuration.idleTick`).
    func idle(_ queue: any DeviceRing, memory: GuestMemory)

    /// Before the thread starts: how to wake it when work arrives from elsewhere.
    func attach(wake: QueueWake)

    /// The queue is stopping (on its thread): complete any chain still held; returns how
    /// many were completed (they are published before GET_VRING_BASE answers).
    func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int

    /// Asked when `serve` found nothing to do and the avail ring still holds entries:
    /// true (the default) when those entries are the handler's work, so the worker polls
    /// again instead of blocking. A handler whose work arrives from elsewhere (net receive:
    /// frames in its inbox, through its `QueueWake`) answers false while it has none, so
    /// buffers the driver posted in advance do not keep its thread spinning.
    func workIsAvailable(_ queue: any DeviceRing) -> Bool
}

extension VhostUserDevice {
    /// No chain limit beyond the queue size.
    public var maximumChainLength: Int { 0 }
    /// Nothing to record.
    public func controlRequestReceived(_ request: Request, payload: [UInt8], descriptors: [Int32]) {}
}

extension QueueHandler {
    /// Nothing to do before used.idx is published.
    public func beforePublish(_ queue: any DeviceRing, memory: GuestMemory) {}
    /// Nothing to do on an idle tick.
    public func idle(_ queue: any DeviceRing, memory: GuestMemory) {}
    public func attach(wake: QueueWake) {}
    public func stopping(_ queue: any DeviceRing, memory: GuestMemory) -> Int { 0 }
    /// The ring is the work.
    public func workIsAvailable(_ queue: any DeviceRing) -> Bool { true }
}

/// Wakes a queue's thread from elsewhere (its `serve` then runs again): for work that
/// arrives from another queue, not from the driver's kick (net: frames another port's
/// transmit queue delivered to this receive queue). Signalling never blocks (our own
/// eventfd, drained by the worker).
public final class QueueWake: Sendable {
    let notifier: Notifier

    /// The worker passes its own wake notifier; a test may pass any eventfd of its own.
    public init(_ notifier: Notifier) { self.notifier = notifier }

    public func signal() { _ = notifier.signal() }
}

/// What the back-end reports: for logs (the CLI), tests and audits.
public enum BackendEvent: Sendable, CustomStringConvertible {
    /// Listening on `path`.
    case listening(path: String)
    /// A front-end connected.
    case connected(connection: Int)
    /// A message arrived and passed the header checks (for trace logs).
    case message(connection: Int, request: UInt32, size: UInt32, descriptors: Int)
    /// The connection ended; `reason` is nil for an orderly close by the front-end.
    case disconnected(connection: Int, reason: VhostUserError?)
    /// A request was refused (answered with a failure, or the connection dropped).
    case rejected(connection: Int, request: UInt32, reason: String)
    /// A queue started serving with `size` descriptors.
    case queueStarted(queue: Int, size: Int)
    /// A queue stopped at available index `index`.
    case queueStopped(queue: Int, index: UInt16)
    /// The driver broke a queue (rule R6: that queue stops, the others keep going).
    case queueFailed(queue: Int, Violation)
    /// A running ring could not follow a memory-table change (its memory went away).
    case queueNotRestarted(queue: Int, reason: String)
    /// A chain was rejected but the queue goes on (the request failed).
    case requestRejected(queue: Int, Violation)
    /// SET_FEATURES accepted (says which ring format the queues will use).
    case featuresAcked(connection: Int, features: UInt64)

    /// One line naming the event.
    public var description: String {
        switch self {
        case .listening(let p): return "listening on \(p)"
        case .connected(let c): return "front-end #\(c) connected"
        case .message(let c, let r, let size, let fds):
            let name = Request(rawValue: r)?.description ?? "request \(r)"
            return "front-end #\(c): \(name) (\(size) bytes, \(fds) fds)"
        case .disconnected(let c, let r):
            return "front-end #\(c) disconnected" + (r.map { ": \($0)" } ?? "")
        case .rejected(let c, let req, let why):
            let name = Request(rawValue: req)?.description ?? "request \(req)"
            return "front-end #\(c): \(name) refused: \(why)"
        case .queueStarted(let q, let n): return "queue \(q) started (size \(n))"
        case .queueStopped(let q, let i): return "queue \(q) stopped at avail index \(i)"
        case .queueFailed(let q, let v): return "queue \(q) failed: \(v)"
        case .queueNotRestarted(let q, let why): return "queue \(q) failed: not restarted after a memory change: \(why)"
        case .requestRejected(let q, let v): return "queue \(q): request rejected: \(v)"
        case .featuresAcked(let c, let f):
            let ring = f & FeatureBits.ringPacked != 0 ? "packed" : "split"
            return "front-end #\(c) acked features 0x\(String(f, radix: 16)) (\(ring) ring)"
        }
    }
}

/// Hook on the control plane: lets an adversary rewrite, drop, or add descriptors to a
/// reply before it is sent. The default back-end has none.
public protocol ControlReplyHook: AnyObject, Sendable {
    /// Called for every reply; return nil to send nothing.
    func willSend(_ reply: Message, answering request: Request) -> Message?
}
