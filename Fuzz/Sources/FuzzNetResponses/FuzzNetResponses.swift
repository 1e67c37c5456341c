import FuzzSupport
import FuzzXenSupport
import SharedMemory
import XenRing

/// The netfront's response handling with the fuzzer as the netback: after the frontend
/// posts tx frames and rx pages, the input lands on both rings' response slots, their
/// rsp_prods and the grant entries. Checked: no trap; a tx completion names a frame in
/// flight, once; a received frame fits the buffer; after a violation the device stays
/// disabled and `failAll` returns only frames that were in flight.
nonisolated(unsafe) let pair = XenFuzzPair()
nonisolated(unsafe) var frame = [UInt8](repeating: 0x42, count: 9000)
nonisolated(unsafe) var buffer = [UInt8](repeating: 0, count: 2048)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair else { return 0 }
    pair.reset()
    var input = FuzzInput(data, size)
    let issuer = GrantIssuer(memory: pair.memory)
    let front = NetFrontend(memory: NetFrontendMemory(grants: pair.memory), grants: issuer, rxPages: 8)
    var inFlight = Set<UInt64>()
    for token in UInt64(1)..<(1 + UInt64(input.byte() % 5)) {
        let length = 1 + Int(input.integer(UInt16.self)) % frame.count
        let gso = input.byte() & 1 == 0 ? nil : NetGSO(type: .tcpv4, size: 1448)
        do {
            try frame.withUnsafeBytes {
                try front.submit(frame: UnsafeRawBufferPointer(rebasing: $0[0..<length]), token: token, gso: gso)
            }
            inFlight.insert(token)
        } catch {}
    }
    front.refillRx()
    _ = front.publishTx()
    _ = front.publishRx()
    // The backend's move: response slots of both rings, grant flags, then both rsp_prods.
    let tx = pair.memory.page(0)
    let rx = pair.memory.page(1)
    input.copy(into: tx + SharedRingLayout.headerSize, count: min(input.remaining, 24 * NetifLayout.txSlotSize))
    input.copy(into: rx + SharedRingLayout.headerSize, count: min(input.remaining, 24 * NetifLayout.rxSlotSize))
    for _ in 0..<Int(input.byte() % 4) {
        let ref = Int(input.byte()) % pair.memory.entryCount
        (pair.table.base + ref * 8).storeBytes(of: input.integer(UInt16.self), as: UInt16.self)
    }
    SharedAccess.store32Release(tx + SharedRingLayout.responseProducer, input.integer(UInt32.self) % 32)
    SharedAccess.store32Release(rx + SharedRingLayout.responseProducer, input.integer(UInt32.self) % 32)
    // Odd-length inputs take the batch calls (the seeds stay valid for both paths).
    if size % 2 == 1 { return fuzzBatches(front, inFlight: inFlight) }
    for _ in 0..<64 {
        do {
            let c = try front.nextTxCompletion()
            if let c { fuzzCheck(inFlight.remove(c.token) != nil, "completion for token \(c.token) not in flight") }
            let r = try buffer.withUnsafeMutableBytes { try front.nextReceived(into: $0) }
            if let r { fuzzCheck(r.length <= buffer.count, "received more than the buffer") }
            if c == nil && r == nil { break }
        } catch {
            let failed = Set(front.failAll())
            fuzzCheck(failed.isSubset(of: inFlight), "failAll returned tokens never posted")
            do {
                _ = try front.nextTxCompletion()
                fuzzCheck(false, "a disabled device completed again")
            } catch {}
            return 0
        }
    }
    return 0
}

nonisolated(unsafe) let completions = UnsafeMutableBufferPointer<NetTxCompletion>.allocate(capacity: 3)
nonisolated(unsafe) let received = UnsafeMutableBufferPointer<NetReceivedFrame>.allocate(capacity: 3)

/// The same checks through `reapTxBatch` and `receiveBatch` (3 per call, 512-byte places):
/// a call that meets a bad response returns what came before it, the next one throws.
func fuzzBatches(_ front: NetFrontend, inFlight: Set<UInt64>) -> Int32 {
    var inFlight = inFlight
    for _ in 0..<64 {
        do {
            let c = try front.reapTxBatch(into: completions)
            for i in 0..<c {
                let token = completions[i].token
                fuzzCheck(inFlight.remove(token) != nil, "batch completion for token \(token) not in flight")
            }
            let r = try buffer.withUnsafeMutableBytes {
                try front.receiveBatch(into: $0, stride: 512, results: received)
            }
            for i in 0..<r { fuzzCheck(received[i].length <= 512, "received more than its place") }
            if c == 0 && r == 0 { break }
        } catch {
            let failed = Set(front.failAll())
            fuzzCheck(failed.isSubset(of: inFlight), "failAll returned tokens never posted")
            do {
                _ = try front.reapTxBatch(into: completions)
                fuzzCheck(false, "a disabled device completed again")
            } catch {}
            return 0
        }
    }
    return 0
}
