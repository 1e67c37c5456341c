import FuzzSupport
import FuzzXenSupport
import SharedMemory
import Virtqueue
import XenRing

/// The blkif backend's request handling with the fuzzer as the frontend: the input lands
/// on req_prod, the request slots and the grant entries (refs, flags, domids, frames).
/// Checked: no trap; the backend maps only frames inside the shared region (the mapper's
/// checks), and the disk never changes size.
nonisolated(unsafe) let pair = XenFuzzPair()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair else { return 0 }
    pair.reset()
    var input = FuzzInput(data, size)
    // Grant entries: {u16 flags, u16 domid, u32 frame} for the first refs.
    for ref in 0..<Int(input.byte() % 16) {
        let e = pair.table.base + ref * 8
        e.storeBytes(of: input.integer(UInt16.self) & 0x1f, as: UInt16.self)
        e.storeBytes(of: UInt16(input.byte() & 1), toByteOffset: 2, as: UInt16.self)
        e.storeBytes(of: UInt32(input.byte() % 40), toByteOffset: 4, as: UInt32.self)
    }
    let ring = pair.ring
    input.copy(into: ring + SharedRingLayout.headerSize, count: min(input.remaining, 6 * BlkifLayout.slotSize))
    SharedAccess.store32Release(ring + SharedRingLayout.requestProducer, input.integer(UInt32.self) % 12)
    let back = BlkBackend(ring: ring, mapper: GrantMapper(memory: pair.memory), storage: pair.storage)
    for _ in 0..<8 {
        do {
            if try back.serve(budget: 8) == 0 { break }
            _ = back.publishResponses()
        } catch {
            break
        }
    }
    fuzzCheck(pair.storage.sectorCount == 256, "the disk changed size")
    return 0
}
