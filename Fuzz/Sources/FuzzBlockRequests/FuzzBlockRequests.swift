import BlockImage
import FuzzSupport
import RingTestSupport
import SharedMemory
import VirtioBlock
import VhostUser
import Virtqueue

/// The virtio-blk device's request handling with the fuzzer as the driver: descriptors,
/// the avail ring, and the bytes they point at (request headers, discard ranges, data)
/// all come from the input. Checked: no trap, the image never grows past its capacity
/// (a write beyond the end must be refused), every chain completes.
let imageSize = 1 << 20
let imagePath = scratchImage(size: imageSize)
nonisolated(unsafe) let pair = try? RingPair(
    queueSize: 16, features: RingFeatures(eventIndex: true, indirectDescriptors: true),
    indirectEntries: 0, bounceBytesPerQueue: 1 << 14)
let device: VirtioBlockDevice? = {
    guard let image = try? DeviceImage(path: imagePath) else { return nil }
    var options = VirtioBlockDeviceOptions()
    options.queueSize = 16
    options.maximumDiscardSegments = 4
    return VirtioBlockDevice(image: image, options: options)
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair, let device else { return 0 }
    var input = FuzzInput(data, size)
    let ring = pair.ring()
    let base = pair.region.base
    base.initializeMemory(as: UInt8.self, repeating: 0, count: pair.region.size)
    guard
        let queue = try? DeviceQueue(
            queueSize: 16, descriptorAddress: pair.guestBase + UInt64(ring.descriptorOffset),
            availAddress: pair.guestBase + UInt64(ring.availOffset),
            usedAddress: pair.guestBase + UInt64(ring.usedOffset),
            features: RingFeatures(eventIndex: true, indirectDescriptors: true), memory: pair.memory)
    else { return 0 }
    let spare = pair.layout.queues[0].bounceOffset
    // Descriptors point into the spare area (most of the time), where the input puts
    // headers and payloads.
    for i in 0..<16 {
        let d = base + ring.descriptorOffset + 16 * i
        let mode = input.byte()
        let address: UInt64 =
            mode & 7 == 0
            ? input.integer() : pair.guestBase + UInt64(spare) + UInt64(input.integer(UInt16.self) % 16384)
        d.storeBytes(of: address, toByteOffset: 0, as: UInt64.self)
        let length: UInt32 = mode & 8 == 0 ? UInt32(input.byte()) : input.integer()
        d.storeBytes(of: length, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: input.integer(UInt16.self) & 0x7, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: UInt16(input.byte() % 17), toByteOffset: 14, as: UInt16.self)
    }
    let availEntries = Int(input.byte() % 17)
    (base + ring.availOffset).storeBytes(of: UInt16(availEntries), toByteOffset: 2, as: UInt16.self)
    for i in 0..<availEntries {
        (base + ring.availOffset).storeBytes(of: UInt16(input.byte() % 18), toByteOffset: 4 + 2 * i, as: UInt16.self)
    }
    // Headers: type, reserved, sector, then payload, repeated across the spare area.
    input.copy(into: base + spare, count: min(input.remaining, 16384))
    let handler = device.makeQueueHandler(queue: 0, features: device.features)
    do {
        var total = 0
        while total < 32 {
            let n = try handler.serve(queue, memory: pair.memory, budget: 8)
            if n == 0 { break }
            total += n
        }
        fuzzCheck(queue.usedIndex == queue.lastAvail, "a popped chain was not completed")
    } catch {
        fuzzCheck(queue.isBroken, "serve threw \(error) without breaking the queue")
    }
    fuzzCheck(fileSize(imagePath) == imageSize, "the image grew or shrank: \(fileSize(imagePath))")
    return 0
}
