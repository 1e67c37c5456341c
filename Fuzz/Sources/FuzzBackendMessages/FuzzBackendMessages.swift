#if canImport(Glibc)
import Glibc
#endif
import BlockImage
import CRingFence
import FuzzSupport
import SharedMemory
import VirtioBlock
import VhostUser

/// The vhost-user back-end's request handling with the fuzzer as the front-end: the input
/// is a sequence of chunks, each sent as one write with 0-3 descriptors attached (an
/// eventfd, a sealed memfd, an unsealed memfd), so descriptor-count mismatches, split
/// headers and bodies, and memory tables with real fds all occur. Then one back-end
/// session serves what was sent, at most `messageLimit` messages of it. Checked: no
/// trap, no hang (libFuzzer's -timeout), the session ends.
///
/// One connection carries every input: `Backend.serveQueued` runs a fresh session over
/// the bytes already queued and ends it when they run out (a message cut short times out
/// at once), and whatever the session left unread, and its replies, are drained before
/// the next input, so nothing carries over. A socket pair per input (socketpair, two
/// shutdowns, two closes) was more than a third of the target's time.
///
/// The eventfd and the memfds are created once and sent again with every chunk that
/// asks for them (SCM_RIGHTS hands the back-end a fresh descriptor each time, which is
/// all it sees): creating them per chunk made the target spend most of its time in
/// memfd_create and ftruncate.
let imagePath = scratchImage(size: 1 << 20)
let backend: Backend? = {
    guard let image = try? DeviceImage(path: imagePath) else { return nil }
    var options = VirtioBlockDeviceOptions()
    options.queueSize = 16
    var configuration = Backend.Configuration()
    configuration.messageDeadline = 0.05  // bounds a reply's send; serveQueued waits for no request
    return Backend(device: VirtioBlockDevice(image: image, options: options), configuration: configuration)
}()
let connection = try? UnixChannel.pair()
/// Messages per session. Enough to negotiate, map memory, set up and start the device's
/// one queue (about 12) and then change what is running; without a limit the corpus
/// drifted towards inputs of 60+ tiny messages (a GET_CONFIG after a GET_CONFIG), and
/// the rate fell from 23k to 11k inputs/s within a 10-minute run.
let messageLimit = 16
let sealed = try? SharedRegion(name: "fuzz-sealed", size: 1 << 16)
let eventNotifier = try? Notifier()
let unsealed: Int32 = {
    let fd = rf_memfd_create("fuzz-unsealed", RF_MFD_CLOEXEC)
    if fd >= 0 { _ = ftruncate(fd, 1 << 16) }
    return fd
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let backend, let (writer, reader) = connection else { return 0 }
    var input = FuzzInput(data, size)
    var chunks = 0
    var fds: [Int32] = []
    fds.reserveCapacity(3)
    while !input.isEmpty && chunks < 32 {
        chunks += 1
        let kind = input.byte()
        let length = Int(input.integer(UInt16.self) % 512)
        let bytes = input.view(length)
        fds.removeAll(keepingCapacity: true)
        for k in 0..<Int(kind % 4) {
            switch (kind >> (2 + 2 * UInt8(k))) & 3 {
            case 0:
                if let eventNotifier { fds.append(eventNotifier.fileDescriptor) }
            case 1:
                if let sealed { fds.append(sealed.fileDescriptor) }
            default:
                if unsealed >= 0 { fds.append(unsealed) }
            }
        }
        if bytes.isEmpty { continue }
        do { try writer.send(bytes, descriptors: fds, until: .after(seconds: 0.05)) } catch { break }
    }
    _ = backend.serveQueued(reader, messageLimit: messageLimit)
    drain(reader.fileDescriptor)  // what the session left (its descriptors are closed as it drains)
    drain(writer.fileDescriptor)  // the session's replies
    return 0
}

/// Reads and discards what is queued on `fd`. A receive without room for descriptors
/// makes the kernel close any that arrive.
func drain(_ fd: Int32) {
    withUnsafeTemporaryAllocation(byteCount: 16384, alignment: 16) { scratch in
        while recv(fd, scratch.baseAddress, scratch.count, Int32(MSG_DONTWAIT)) > 0 {}
    }
}
