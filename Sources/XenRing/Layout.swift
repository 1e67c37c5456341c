/// Byte layout of Xen's `io/ring.h` shared ring page (`struct blkif_sring`): a 64-byte
/// header, then slots of the request/response union. Offsets are checked against the C
/// headers by `XenLayoutTests` (binary compatibility with real PV peers).
public enum SharedRingLayout {
    /// Bytes of one ring page (and of every granted frame).
    public static let pageSize = 4096
    /// Offset of `req_prod` (written by the frontend).
    public static let requestProducer = 0
    /// Offset of `req_event` (the backend asks for a notification at this index).
    public static let requestEvent = 4
    /// Offset of `rsp_prod` (written by the backend).
    public static let responseProducer = 8
    /// Offset of `rsp_event` (the frontend asks for a notification at this index).
    public static let responseEvent = 12
    /// Offset of the private padding (never read).
    public static let privatePad = 16
    /// Offset of the remaining padding (never read).
    public static let pad = 20
    /// Bytes before the first slot.
    public static let headerSize = 64

    /// Slots in a ring of `pages` pages with `slotSize`-byte entries: Xen's `__RD32`,
    /// the largest power of two that fits. 0 if none fits.
    public static func slotCount(pages: Int, slotSize: Int) -> Int {
        guard pages > 0, pages <= 16, slotSize > 0 else { return 0 }
        let fit = (pages * pageSize - headerSize) / slotSize
        guard fit > 0 else { return 0 }
        return 1 << (Int.bitWidth - 1 - fit.leadingZeroBitCount)
    }
}

/// `io/blkif.h`: 112-byte `blkif_request` (up to 11 segments), 16-byte `blkif_response`.
public enum BlkifLayout {
    /// Bytes of one slot (the request/response union).
    public static let slotSize = 112
    /// Bytes of `blkif_request`.
    public static let requestSize = 112
    /// Offset of `operation` (BLKIF_OP_*).
    public static let operation = 0
    /// Offset of `nr_segments`.
    public static let segmentCount = 1
    /// Offset of `handle` (the virtual device).
    public static let handle = 2
    /// Offset of `id` (echoed by the response).
    public static let id = 8
    /// Offset of `sector_number` (512-byte sectors).
    public static let sectorNumber = 16
    /// Offset of the first `blkif_request_segment`.
    public static let segments = 24
    /// Bytes of one `blkif_request_segment`.
    public static let segmentSize = 8
    /// Offset of `gref` in a segment.
    public static let segmentGrantRef = 0
    /// Offset of `first_sect` in a segment (0...7).
    public static let segmentFirstSector = 4
    /// Offset of `last_sect` in a segment (first_sect...7).
    public static let segmentLastSector = 5
    /// `blkif_request_discard`
    public static let discardFlag = 1
    /// Offset of `nr_sectors` in `blkif_request_discard`.
    public static let discardSectorCount = 24

    /// Bytes of `blkif_response`.
    public static let responseSize = 16
    /// Offset of `id` in a response.
    public static let responseId = 0
    /// Offset of `operation` in a response.
    public static let responseOperation = 8
    /// Offset of `status` in a response (BLKIF_RSP_*).
    public static let responseStatus = 10

    /// BLKIF_MAX_SEGMENTS_PER_REQUEST.
    public static let maxSegments = 11
    /// Ring sectors are always 512 bytes (blkif.h), whatever `sector-size` says.
    public static let sectorSize = 512
    /// 512-byte sectors in one page.
    public static let sectorsPerPage = 8
    /// Slots in a one-page blkif ring (32).
    public static let ringSize = SharedRingLayout.slotCount(pages: 1, slotSize: slotSize)
}

/// `grant_table.h` v1 entry: `{ uint16 flags; domid_t domid; uint32 frame; }`.
public enum GrantLayout {
    /// Bytes of one v1 grant entry.
    public static let entrySize = 8
    /// Offset of `flags`.
    public static let flags = 0
    /// Offset of `domid` (the domain granted access).
    public static let domid = 2
    /// Offset of `frame`.
    public static let frame = 4
    /// GTF_permit_access.
    public static let permitAccess: UInt16 = 1
    /// GTF_type_mask.
    public static let typeMask: UInt16 = 3
    /// GTF_readonly.
    public static let readOnly: UInt16 = 1 << 2
    /// GTF_reading (set while the peer maps the page).
    public static let reading: UInt16 = 1 << 3
    /// GTF_writing (set while the peer maps the page writable).
    public static let writing: UInt16 = 1 << 4
    /// Refs 0..<8 are reserved by Xen (GNTTAB_NR_RESERVED_ENTRIES).
    public static let reservedEntries = 8
}

/// blkif operations this module speaks.
public enum BlkOperation: UInt8, Sendable, CaseIterable {
    /// BLKIF_OP_READ.
    case read = 0
    /// BLKIF_OP_WRITE.
    case write = 1
    /// BLKIF_OP_FLUSH_DISKCACHE.
    case flush = 3
    /// BLKIF_OP_DISCARD.
    case discard = 5
}

/// blkif response status: only these three are accepted from a backend (R3).
public enum BlkStatus: Int16, Sendable {
    /// BLKIF_RSP_OKAY.
    case okay = 0
    /// BLKIF_RSP_ERROR.
    case error = -1
    /// BLKIF_RSP_EOPNOTSUPP.
    case notSupported = -2
}

/// xenbus states (`io/xenbus.h`).
public enum XenbusState: UInt8, Sendable {
    /// XenbusStateUnknown.
    case unknown = 0
    /// XenbusStateInitialising.
    case initialising = 1
    /// XenbusStateInitWait.
    case initWait = 2
    /// XenbusStateInitialised.
    case initialised = 3
    /// XenbusStateConnected.
    case connected = 4
    /// XenbusStateClosing.
    case closing = 5
    /// XenbusStateClosed.
    case closed = 6
}
