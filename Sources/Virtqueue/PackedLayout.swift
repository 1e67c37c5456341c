/// Byte layout of a virtio 1.x packed virtqueue (virtio spec §2.8). Little-endian.
///
/// ```
/// descriptor ring   16 * N bytes, align 16: { le64 addr; le32 len; le16 id; le16 flags }
/// driver area       4 bytes,      align 4:  { le16 off_wrap; le16 flags }  (driver writes)
/// device area       4 bytes,      align 4:  { le16 off_wrap; le16 flags }  (device writes)
/// ```
///
/// The driver and the device write the same descriptor ring: the driver marks a slot
/// available with AVAIL = its wrap counter and USED = the opposite; the device marks it
/// used with AVAIL = USED = its wrap counter. Both wrap counters start at 1.
public enum PackedLayout {
    /// Bytes of one packed descriptor.
    public static let descriptorSize = 16
    /// Largest queue size.
    public static let maximumQueueSize = 32768

    // Descriptor fields.
    /// Offset of `addr` in a descriptor.
    public static let descAddr = 0
    /// Offset of `len`.
    public static let descLen = 8
    /// Offset of `id`.
    public static let descID = 12
    /// Offset of `flags`.
    public static let descFlags = 14

    // Descriptor flags.
    /// VIRTQ_DESC_F_NEXT.
    public static let flagNext: UInt16 = 1
    /// VIRTQ_DESC_F_WRITE.
    public static let flagWrite: UInt16 = 2
    /// VIRTQ_DESC_F_INDIRECT.
    public static let flagIndirect: UInt16 = 4
    /// VIRTQ_DESC_F_AVAIL.
    public static let flagAvail: UInt16 = 1 << 7
    /// VIRTQ_DESC_F_USED.
    public static let flagUsed: UInt16 = 1 << 15

    // Event suppression structure (driver area and device area).
    /// Offset of `off_wrap` in an event suppression area.
    public static let eventOffWrap = 0
    /// Offset of `flags` in an event suppression area.
    public static let eventFlags = 2
    /// Bytes of an event suppression area.
    public static let eventAreaSize = 4
    /// RING_EVENT_FLAGS_ENABLE.
    public static let eventFlagEnable: UInt16 = 0
    /// RING_EVENT_FLAGS_DISABLE.
    public static let eventFlagDisable: UInt16 = 1
    /// Only with VIRTIO_F_RING_EVENT_IDX: notify when the ring reaches off_wrap.
    public static let eventFlagDescriptor: UInt16 = 2
    /// off_wrap: bit 15 is the wrap counter, bits 0-14 the ring offset.
    public static let eventWrapBit: UInt16 = 1 << 15

    /// Bytes of a descriptor ring of `n` entries.
    public static func ringSize(_ n: Int) -> Int { 16 * n }

    /// The packed ring has no power-of-two requirement.
    public static func isValidQueueSize(_ n: Int) -> Bool { n >= 1 && n <= maximumQueueSize }

    /// The AVAIL/USED bits of a descriptor the driver makes available in lap `wrap`.
    @inline(__always)
    public static func availableMarker(wrap: Bool) -> UInt16 { wrap ? flagAvail : flagUsed }

    /// The AVAIL/USED bits of a descriptor the device marks used in lap `wrap`.
    @inline(__always)
    public static func usedMarker(wrap: Bool) -> UInt16 { wrap ? flagAvail | flagUsed : 0 }

    /// `vring_need_event` for a packed event suppression snapshot (Linux's
    /// virtqueue_kick_prepare_packed, QEMU's vring_packed_need_event): the side that moved
    /// its ring position from `old` to `new` (both in 0..<size, `wrap` its current wrap
    /// counter) should notify if the peer's `offWrap` lies in between. Wrap-safe for any
    /// values; the caller has already checked the offset is inside the ring.
    @inline(__always)
    public static func needEvent(offWrap: UInt16, wrap: Bool, new: UInt16, old: UInt16, size: UInt16) -> Bool {
        var event = offWrap & ~eventWrapBit
        if (offWrap & eventWrapBit != 0) != wrap { event = event &- size }
        return SplitLayout.needEvent(event: event, new: new, old: old)
    }

    /// Encodes a vring base (SET/GET_VRING_BASE) as QEMU does: next avail in bits 0-14,
    /// its wrap counter in bit 15, the used position and wrap counter in bits 16-31.
    public static func encodeBase(avail: UInt16, availWrap: Bool, used: UInt16, usedWrap: Bool) -> UInt32 {
        let a = UInt32(avail & 0x7fff) | (availWrap ? 0x8000 : 0)
        let u = UInt32(used & 0x7fff) | (usedWrap ? 0x8000 : 0)
        return a | u << 16
    }

    /// Decodes a vring base; a front-end that sends only 16 bits (DPDK) means used = avail.
    public static func decodeBase(_ num: UInt32) -> (avail: UInt16, availWrap: Bool, used: UInt16, usedWrap: Bool) {
        let avail = UInt16(truncatingIfNeeded: num) & 0x7fff
        let availWrap = num & 0x8000 != 0
        guard num >> 16 != 0 else { return (avail, availWrap, avail, availWrap) }
        return (avail, availWrap, UInt16(truncatingIfNeeded: num >> 16) & 0x7fff, num & 0x8000_0000 != 0)
    }
}
