#if canImport(Glibc)
import Glibc
#endif
import CRingFence
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

/// Empties `path` (files, links, directories below it), without following links. Names
/// stay bytes (the device creates names that are not UTF-8, which a `String` would alter)
/// and are read in place (`rf_dirent_name`).
func empty(_ path: [UInt8]) {
    guard let dir = opendir(cPath(path)) else { return }
    var names: [[UInt8]] = []
    while let e = readdir(dir) {
        guard let p = rf_dirent_name(e) else { continue }
        let name = Array(UnsafeRawBufferPointer(start: p, count: strlen(p)))
        if name != [0x2e] && name != [0x2e, 0x2e] { names.append(name) }
    }
    closedir(dir)
    for n in names {
        let p = path + [0x2f] + n
        var st = stat()
        guard lstat(cPath(p), &st) == 0 else { continue }
        if st.st_mode & S_IFMT == S_IFDIR {
            chmod(cPath(p), 0o755)
            empty(p)
            rmdir(cPath(p))
        } else {
            unlink(cPath(p))
        }
    }
}

func empty(_ path: String) { empty(Array(path.utf8)) }

/// A NUL-terminated copy of `path` for the C calls.
func cPath(_ path: [UInt8]) -> [CChar] { path.map { CChar(bitPattern: $0) } + [0] }

func isEmpty(_ path: String) -> Bool {
    guard let dir = opendir(path) else { return false }
    defer { closedir(dir) }
    var count = 0
    while readdir(dir) != nil { count += 1 }
    return count <= 2
}

/// Once, before the first input: the served directory gets 1,500 entries with names of at
/// most four bytes, every third not UTF-8, so listing it fills `getdents` buffers edge to
/// edge. Then INIT and OPENDIR of the root (the `opendir-root` seed) go through the device,
/// which lists the directory at OPENDIR. A name read past the end of the C library's
/// buffer (the device copied the whole 256-byte `d_name` before `rf_dirent_name`) stops
/// the run here under ASan, whatever the fuzzer does next; the names must all arrive.
@_cdecl("LLVMFuzzerInitialize")
public func initialize(_ argc: UnsafeMutablePointer<Int32>?, _ argv: UnsafeMutableRawPointer?) -> Int32 {
    let root = scratch + "/root"
    for i in 0..<1500 {
        let name = (i % 3 == 0 ? [0xfe] : []) + Array(String(i, radix: 36).utf8)
        let fd = open(cPath(Array(root.utf8) + [0x2f] + name), O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
        fuzzCheck(fd >= 0, "startup: cannot create the entries to list")
        close(fd)
    }
    var seed: [UInt8] = []
    func descriptor(_ offset: UInt16, _ length: UInt16, _ flags: UInt16, _ next: UInt8) {
        seed.append(1)  // the address is an offset into the spare area
        for v in [offset, length, flags] { seed += [UInt8(v & 0xff), UInt8(v >> 8)] }
        seed.append(next)
    }
    descriptor(0, 104, 1, 1)  // INIT, then its reply (writable) at 0x400
    descriptor(0x400, 80, 2, 0)
    descriptor(0x100, 48, 1, 3)  // OPENDIR of node 1, then its reply at 0x600
    descriptor(0x600, 32, 2, 0)
    for _ in 4..<16 { descriptor(0, 0, 0, 0) }
    seed += [2, 0, 2]  // two chains: heads 0 and 2
    var spare = [UInt8](repeating: 0, count: 0x700)
    func put(_ value: UInt64, _ size: Int, at offset: Int) {
        for k in 0..<size { spare[offset + k] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(k))) }
    }
    put(104, 4, at: 0)  // INIT: length, opcode 26, unique 2, FUSE 7.36
    put(26, 4, at: 4)
    put(2, 8, at: 8)
    put(7, 4, at: 40)
    put(36, 4, at: 44)
    put(48, 4, at: 0x100)  // OPENDIR: length, opcode 27, unique 3, node 1, flags 0
    put(27, 4, at: 0x104)
    put(3, 8, at: 0x108)
    put(1, 8, at: 0x110)
    seed += spare
    _ = seed.withUnsafeBufferPointer { fuzz($0.baseAddress, $0.count) }
    if let pair {
        let reply = pair.region.base + pair.layout.queues[0].bounceOffset + 0x600
        let length = reply.loadUnaligned(as: UInt32.self)
        let error = reply.loadUnaligned(fromByteOffset: 4, as: Int32.self)
        fuzzCheck(length == 32 && error == 0, "startup: OPENDIR of the served directory failed (\(length), \(error))")
    }
    device?.frontendDisconnected()
    empty(root)
    return 0
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
