import FuzzSupport
import RingTestSupport
import SharedMemory
import Virtqueue

/// The packed device's chain walk with the fuzzer as the driver: its bytes land on the
/// descriptor ring (flags often carrying the available mark, addresses often inside the
/// region), the driver area and a spare area indirect tables may point into.
/// Checked: no trap, every segment lies inside the shared region, ids handed out are in
/// range, a chain never has more segments than ring + table allow, a throw means broken;
/// runs popped with `nextBuffers` (mixed with `nextChain` as the fuzzer picks): at most the
/// capacity, ids in range and distinct, buffers inside the region.
nonisolated(unsafe) let pair = try? PackedRingPair(
    queueSize: 16, features: RingFeatures(eventIndex: true, indirectDescriptors: true),
    indirectEntries: 0, bounceBytesPerQueue: 1 << 14)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair else { return 0 }
    var input = FuzzInput(data, size)
    let base = pair.region.base
    base.initializeMemory(as: UInt8.self, repeating: 0, count: pair.region.size)
    let a = pair.layout.ringAddresses(queue: 0, guestBase: pair.guestBase)
    let start = input.byte()
    guard
        let device = try? PackedDeviceQueue(
            queueSize: 16, ringAddress: a.descriptors, driverAreaAddress: a.avail, deviceAreaAddress: a.used,
            features: RingFeatures(eventIndex: start & 1 == 1, indirectDescriptors: start & 2 == 2),
            memory: pair.memory, base: start & 4 == 0 ? 0x8000_8000 : UInt32(input.integer(UInt16.self)))
    else { return 0 }
    for i in 0..<16 {
        let mode = input.byte()
        let address: UInt64 =
            mode & 3 == 0 ? input.integer() : pair.guestBase + UInt64(input.integer(UInt16.self))
        let length: UInt32 = mode & 4 == 0 ? UInt32(input.byte()) : input.integer()
        var flags = input.integer(UInt16.self)
        if mode & 8 == 0 { flags = flags & 0x7 | PackedLayout.availableMarker(wrap: mode & 16 == 0) }
        pair.writeDescriptor(i, address: address, length: length, id: UInt16(input.byte() % 20), flags: flags)
    }
    input.copy(into: pair.driverArea(), count: 4)
    // Per step, bit k of `choices`: pop a run with `nextBuffers` (capacity from `sizes`)
    // instead of one chain with `nextChain`, as serve-net's transmit handler does.
    let choices: UInt64 = input.integer()
    let sizes: UInt64 = input.integer()
    let spare = pair.layout.queues[0].bounceOffset
    input.copy(into: base + spare, count: min(input.remaining, 4096))
    let low = UInt(bitPattern: base)
    let high = low + UInt(pair.region.size)
    var chain = DescriptorChain()
    let popped = UnsafeMutablePointer<PoppedBuffer>.allocate(capacity: 8)
    defer { popped.deallocate() }
    for step in 0..<40 {
        do {
            if choices >> (step % 64) & 1 == 1 {
                let capacity = Int(sizes >> (3 * (step % 21)) & 7) + 1
                let n = try device.nextBuffers(into: popped, capacity: capacity, memory: pair.memory)
                fuzzCheck(n >= 0 && n <= capacity, "popped \(n) of at most \(capacity)")
                for i in 0..<n {
                    let b = popped[i]
                    fuzzCheck(b.id < 16, "popped id \(b.id) out of range")
                    let start = UInt(bitPattern: b.bytes.baseAddress)
                    fuzzCheck(
                        b.bytes.count == 0 || (start >= low && start + UInt(b.bytes.count) <= high),
                        "popped buffer outside the region")
                    for j in 0..<i { fuzzCheck(popped[j].id != b.id, "id \(b.id) popped twice in one run") }
                }
                if n > 0 {
                    device.completeUnwritten(popped, count: n)
                    _ = device.publishUsed()
                    continue
                }
            }
            switch try device.nextChain(into: &chain, memory: pair.memory) {
            case .empty: return 0
            case .rejected(let id, _):
                fuzzCheck(id < 16, "rejected id \(id) out of range")
                device.complete(head: id, length: 0)
            case .ready:
                fuzzCheck(chain.head < 16, "id \(chain.head) out of range")
                fuzzCheck(chain.segments.count <= 16 + 256 + 2 * 16, "chain of \(chain.segments.count) segments")
                for s in chain.segments {
                    let start = UInt(bitPattern: s.buffer.baseAddress)
                    fuzzCheck(
                        s.buffer.count == 0 || (start >= low && start + UInt(s.buffer.count) <= high),
                        "segment outside the region")
                }
                device.complete(head: chain.head, length: UInt32(truncatingIfNeeded: chain.writableLength))
            }
            _ = device.publishUsed()
        } catch {
            fuzzCheck(device.isBroken, "threw but not broken")
            return 0
        }
    }
    return 0
}
