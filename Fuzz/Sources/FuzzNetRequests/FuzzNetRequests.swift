import FuzzSupport
import FuzzXenSupport
import SharedMemory
import XenRing

/// The netback with the fuzzer as the netfront: the input lands on the tx request slots,
/// the rx request slots, both req_prods and the grant table (a few honest grants
/// included). Checked: no trap; every delivered frame is 1...65535 bytes; a violation
/// (connection dropped) or answers, never a loop.
nonisolated(unsafe) let pair = XenFuzzPair()
nonisolated(unsafe) var frame = [UInt8](repeating: 0x17, count: 5000)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair else { return 0 }
    pair.reset()
    var input = FuzzInput(data, size)
    // Honest grants of frames 2...9 as refs 8...15 (even: read-only).
    for k in 0..<8 {
        let e = pair.table.base + (8 + k) * 8
        e.storeBytes(of: UInt32(2 + k), toByteOffset: 4, as: UInt32.self)
        e.storeBytes(of: UInt16(1 | (k % 2 == 0 ? 4 : 0)), toByteOffset: 0, as: UInt16.self)
    }
    let tx = pair.memory.page(0)
    let rx = pair.memory.page(1)
    input.copy(into: tx + SharedRingLayout.headerSize, count: min(input.remaining, 32 * NetifLayout.txSlotSize))
    input.copy(into: rx + SharedRingLayout.headerSize, count: min(input.remaining, 16 * NetifLayout.rxSlotSize))
    for _ in 0..<Int(input.byte() % 4) {
        let ref = Int(input.byte()) % pair.memory.entryCount
        (pair.table.base + ref * 8).storeBytes(of: input.integer(UInt64.self), as: UInt64.self)
    }
    SharedAccess.store32Release(tx + SharedRingLayout.requestProducer, input.integer(UInt32.self) % 300)
    SharedAccess.store32Release(rx + SharedRingLayout.requestProducer, input.integer(UInt32.self) % 300)
    let back = NetBackend(txRing: tx, rxRing: rx, mapper: GrantMapper(memory: pair.memory))
    do {
        _ = try back.serveTx(budget: 64) { f in
            fuzzCheck(f.bytes.count >= 1 && f.bytes.count <= NetifLayout.maxFrameSize, "frame size out of range")
        }
        for _ in 0..<4 {
            let length = 1 + Int(input.integer(UInt16.self)) % frame.count
            _ = try frame.withUnsafeBytes { try back.send(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
        }
        _ = back.publishResponses()
    } catch {}
    return 0
}
