import SharedMemory

/// State of one vring as the control messages set it; private to the back-end, so a
/// ring is built only from values the front-end cannot change afterwards (§4).
final class Vring {
    var size: Int?
    /// SET_VRING_BASE as received: the avail index (split), or with wrap counters (packed).
    var base: UInt32 = 0
    var address: VringAddress?
    var kickReceived = false
    var kick: Notifier?
    let call = CallSlot()
    var err: Notifier?
    var enabled = false
    var worker: QueueWorker?
}
