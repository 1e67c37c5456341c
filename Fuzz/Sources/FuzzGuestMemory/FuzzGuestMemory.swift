import FuzzSupport
import SharedMemory

/// GuestMemory's region table and translation with fuzzer-chosen regions and ranges.
/// Checked against a simple model: translate succeeds exactly when one region holds the
/// whole range without wrapping, and the pointer it returns lies inside that mapping.
let mappings: [SharedRegion] = (0..<4).compactMap {
    try? SharedRegion(name: "fuzz", size: 4096 * ($0 + 1))
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    var memory = GuestMemory()
    var accepted: [GuestRegion] = []
    for _ in 0..<Int(input.byte() % 10) {
        let mapping = mappings[Int(input.byte()) % mappings.count]
        let guest: UInt64 = input.byte() & 1 == 0 ? input.integer() : UInt64(input.integer(UInt16.self)) << 12
        let user: UInt64 = input.integer()
        let region = GuestRegion(guestAddress: guest, userAddress: user, mapping: mapping)
        do {
            try memory.add(region)
            accepted.append(region)
        } catch {}
    }
    fuzzCheck(memory.regions.count == accepted.count, "region count drifted")
    while !input.isEmpty {
        let address: UInt64 =
            input.byte() & 1 == 0
            ? input.integer()
            : (accepted.isEmpty ? 0 : accepted[Int(input.byte()) % accepted.count].guestAddress)
                &+ UInt64(input.integer(UInt16.self))
        let length = UInt64(input.integer(UInt16.self))
        let (end, wraps) = address.addingReportingOverflow(length)
        let holder = accepted.first { address >= $0.guestAddress && address - $0.guestAddress < $0.size }
        let expected = !wraps && holder.map { end <= $0.guestAddress + $0.size } == true
        do {
            let buffer = try memory.translate(address, length: length)
            fuzzCheck(expected, "translated \(address)+\(length) that the model rejects")
            if let holder {
                let low = UInt(bitPattern: holder.mapping.base)
                let start = UInt(bitPattern: buffer.baseAddress)
                fuzzCheck(
                    start >= low && start + UInt(buffer.count) <= low + UInt(holder.mapping.size), "outside mapping")
            }
        } catch {
            fuzzCheck(!expected, "rejected \(address)+\(length): \(error)")
        }
    }
    return 0
}
