import FuzzSupport
import RingTestSupport
import SharedMemory
import Virtqueue

/// The device's avail-ring and descriptor-chain walk with the fuzzer as the driver: its
/// bytes land on the descriptor table, the avail ring and a spare area addresses can
/// point into. Checked: no trap, every segment handed out lies inside the shared region,
/// the walk never yields a chain longer than the table allows.
nonisolated(unsafe) let pair = try? RingPair(
    queueSize: 16, features: RingFeatures(eventIndex: true, indirectDescriptors: true),
    indirectEntries: 0, bounceBytesPerQueue: 1 << 14)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair else { return 0 }
    var input = FuzzInput(data, size)
    let ring = pair.ring()
    let base = pair.region.base
    base.initializeMemory(as: UInt8.self, repeating: 0, count: pair.region.size)
    guard
        let device = try? DeviceQueue(
            queueSize: 16, descriptorAddress: pair.guestBase + UInt64(ring.descriptorOffset),
            availAddress: pair.guestBase + UInt64(ring.availOffset),
            usedAddress: pair.guestBase + UInt64(ring.usedOffset),
            features: RingFeatures(eventIndex: input.byte() & 1 == 1, indirectDescriptors: input.byte() & 1 == 1),
            memory: pair.memory)
    else { return 0 }
    // Descriptors: let addresses often land inside the region so chains get deep.
    for i in 0..<16 {
        let d = base + ring.descriptorOffset + 16 * i
        let mode = input.byte()
        let address: UInt64 =
            mode & 3 == 0 ? input.integer() : pair.guestBase + UInt64(input.integer(UInt16.self))
        d.storeBytes(of: address, toByteOffset: 0, as: UInt64.self)
        d.storeBytes(
            of: mode & 4 == 0 ? UInt32(input.byte()) : input.integer(UInt32.self), toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: input.integer(UInt16.self) & 0x7, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: UInt16(input.byte() % 20), toByteOffset: 14, as: UInt16.self)
    }
    input.copy(into: base + ring.availOffset, count: SplitLayout.availRingSize(16))
    // The rest goes into the bounce area, where indirect tables may point.
    let spare = pair.layout.queues[0].bounceOffset
    input.copy(into: base + spare, count: min(input.remaining, 4096))
    let low = UInt(bitPattern: base)
    let high = low + UInt(pair.region.size)
    var chain = DescriptorChain()
    for _ in 0..<40 {
        do {
            switch try device.nextChain(into: &chain, memory: pair.memory) {
            case .empty: return 0
            case .rejected(let head, _):
                fuzzCheck(head < 16, "rejected head \(head) out of range")
                device.complete(head: head, length: 0)
            case .ready:
                fuzzCheck(chain.segments.count <= 16 * 2, "chain of \(chain.segments.count) segments")
                for s in chain.segments {
                    let start = UInt(bitPattern: s.buffer.baseAddress)
                    fuzzCheck(
                        s.buffer.count == 0 || (start >= low && start + UInt(s.buffer.count) <= high),
                        "segment outside the region")
                }
                device.complete(head: chain.head, length: 0)
            }
        } catch {
            fuzzCheck(device.isBroken, "threw but not broken")
            return 0
        }
    }
    return 0
}
