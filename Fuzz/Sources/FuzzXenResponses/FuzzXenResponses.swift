import FuzzSupport
import FuzzXenSupport
import SharedMemory
import Virtqueue
import XenRing

/// The blkif frontend's response handling with the fuzzer as the backend: after the
/// frontend posts reads and writes, the input lands on the response slots, rsp_prod and
/// the grant entries. Checked: no trap; a completion names a token that was in flight,
/// once; after a violation the device stays disabled and `failAll` returns the rest.
nonisolated(unsafe) let pair = XenFuzzPair()
nonisolated(unsafe) var buffer = [UInt8](repeating: 0, count: 8 * 4096)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair else { return 0 }
    pair.reset()
    var input = FuzzInput(data, size)
    let issuer = GrantIssuer(memory: pair.memory)
    let front = BlkFrontend(memory: BlkFrontendMemory(grants: pair.memory), grants: issuer, capacitySectors: 256)
    var inFlight = Set<UInt64>()
    var token: UInt64 = 0
    buffer.withUnsafeMutableBytes { all in
        for _ in 0..<Int(input.byte() % 6) {
            token += 1
            let pages = 1 + Int(input.byte() % 2)
            let chunk = UnsafeMutableRawBufferPointer(
                rebasing: all[(Int(token % 3) * 8192)..<(Int(token % 3) * 8192 + pages * 4096)])
            let sector = UInt64(input.byte())
            do {
                if input.byte() & 1 == 0 {
                    _ = try front.submitRead(sector: sector, into: chunk, token: token)
                } else {
                    _ = try front.submitWrite(sector: sector, from: UnsafeRawBufferPointer(chunk), token: token)
                }
                inFlight.insert(token)
            } catch {}
        }
    }
    _ = front.publish()
    // The backend's move: response slots, then grant flags, then rsp_prod.
    let ring = pair.ring
    input.copy(into: ring + SharedRingLayout.headerSize, count: min(input.remaining, 8 * BlkifLayout.slotSize))
    for _ in 0..<Int(input.byte() % 4) {
        let ref = Int(input.byte()) % pair.memory.entryCount
        (pair.table.base + ref * 8).storeBytes(of: input.integer(UInt16.self), as: UInt16.self)
    }
    SharedAccess.store32Release(ring + SharedRingLayout.responseProducer, input.integer(UInt32.self) % 16)
    for _ in 0..<40 {
        do {
            guard let c = try front.nextCompletion() else { break }
            fuzzCheck(inFlight.remove(c.token) != nil, "completion for token \(c.token) not in flight")
        } catch {
            let failed = Set(front.failAll())
            fuzzCheck(failed.isSubset(of: inFlight), "failAll returned tokens never posted")
            do {
                _ = try front.nextCompletion()
                fuzzCheck(false, "a disabled device completed again")
            } catch {}
            return 0
        }
    }
    return 0
}
