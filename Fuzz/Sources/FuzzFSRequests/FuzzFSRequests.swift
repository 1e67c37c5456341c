#if canImport(Glibc)
import Glibc
#endif
import FuzzSupport
import RingTestSupport
import SharedMemory
import VhostUser
import VirtioFS
import Virtqueue

/// The virtio-fs device's request handling with the fuzzer as the driver: descriptors,
/// the avail ring and the FUSE requests they point at all come from the input, against a
/// real directory. Checked: no trap, every popped chain completes, and nothing appears
/// outside the served directory (its sibling stays empty). Every 512 inputs the session
/// is dropped (as on a disconnect) and the directory emptied, so it cannot grow forever.
let scratch: String = {
    let base = "/dev/shm/ringfence-fuzz-fs-\(getpid())"
    mkdir(base, 0o755)
    mkdir(base + "/root", 0o755)
    mkdir(base + "/outside", 0o755)
    atexit {
        empty(scratch)
        rmdir(scratch)
    }
    return base
}()
nonisolated(unsafe) let pair = try? RingPair(
    queueSize: 16, features: RingFeatures(eventIndex: true, indirectDescriptors: true),
    indirectEntries: 0, bounceBytesPerQueue: 1 << 14)
let device: VirtioFSDevice? = {
    var options = VirtioFSDeviceOptions(directory: scratch + "/root")
    options.maximumInodes = 64
    options.maximumHandles = 16
    options.maximumTransfer = 8192
    return try? VirtioFSDevice(options: options)
}()
nonisolated(unsafe) var inputs = 0

/// Empties `path` (files, links, directories below it), without following links.
func empty(_ path: String) {
    guard let dir = opendir(path) else { return }
    var names: [String] = []
    while let e = readdir(dir) {
        let name = withUnsafeBytes(of: e.pointee.d_name) {
            String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
        if name != "." && name != ".." { names.append(name) }
    }
    closedir(dir)
    for n in names {
        let p = path + "/" + n
        var st = stat()
        guard lstat(p, &st) == 0 else { continue }
        if st.st_mode & S_IFMT == S_IFDIR {
            chmod(p, 0o755)
            empty(p)
            rmdir(p)
        } else {
            unlink(p)
        }
    }
}

func isEmpty(_ path: String) -> Bool {
    guard let dir = opendir(path) else { return false }
    defer { closedir(dir) }
    var count = 0
    while readdir(dir) != nil { count += 1 }
    return count <= 2
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair, let device else { return 0 }
    inputs += 1
    if inputs % 512 == 0 {
        device.frontendDisconnected()
        empty(scratch + "/root")
    }
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
    for i in 0..<16 {
        let d = base + ring.descriptorOffset + 16 * i
        let mode = input.byte()
        let address: UInt64 =
            mode & 15 == 0
            ? input.integer() : pair.guestBase + UInt64(spare) + UInt64(input.integer(UInt16.self) % 16384)
        d.storeBytes(of: address, toByteOffset: 0, as: UInt64.self)
        let length: UInt32 = mode & 16 == 0 ? UInt32(input.integer(UInt16.self) % 4096) : input.integer()
        d.storeBytes(of: length, toByteOffset: 8, as: UInt32.self)
        d.storeBytes(of: input.integer(UInt16.self) & 0x7, toByteOffset: 12, as: UInt16.self)
        d.storeBytes(of: UInt16(input.byte() % 17), toByteOffset: 14, as: UInt16.self)
    }
    let availEntries = Int(input.byte() % 17)
    (base + ring.availOffset).storeBytes(of: UInt16(availEntries), toByteOffset: 2, as: UInt16.self)
    for i in 0..<availEntries {
        (base + ring.availOffset).storeBytes(of: UInt16(input.byte() % 18), toByteOffset: 4 + 2 * i, as: UInt16.self)
    }
    // FUSE requests (header, arguments, names) across the spare area.
    input.copy(into: base + spare, count: min(input.remaining, 16384))
    let handler = device.makeQueueHandler(queue: 1, features: device.features)
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
    fuzzCheck(isEmpty(scratch + "/outside"), "something appeared outside the served directory")
    return 0
}
