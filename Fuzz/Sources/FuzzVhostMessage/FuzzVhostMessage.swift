#if canImport(Glibc)
import Glibc
#endif
import FuzzSupport
import SharedMemory
import VhostUser

/// vhost-user message decoding as either side meets it: the fuzzer's bytes are written
/// to one end of a socket pair and read back by `MessageChannel.receive` (header check,
/// size bound before the body), then every payload decoder runs on the body. Checked: no
/// trap, a decoded payload re-encodes to the same bytes.
///
/// One socket pair serves every input. All of an input is written before anything is
/// read, so a receive that finds the stream empty has met the input's end: with the
/// deadline `.now` a message cut short ends as a timeout at once, and whatever the
/// channel did not consume (the rest of a refused message, messages past the eighth) is
/// drained before the next input, so nothing carries over. A fresh pair per input cost a
/// socketpair and two closes, a fifth of the target's time. (What this gives up is the
/// receive's one-line end-of-stream branch, `.closed`; UnixChannelTests and every
/// dropped-connection test cover it.)
let pair = try? UnixChannel.pair()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let (writer, reader) = pair else { return 0 }
    var input = FuzzInput(data, size)
    let bytes = input.view(min(size, 8192))  // a few messages; the largest (12 + 4096 bytes) fits
    // 8 KiB fits the socket buffer: the write completes without a reader.
    do { try writer.send(bytes, until: .after(seconds: 1)) } catch { fuzzCheck(false, "send: \(error)") }
    let channel = MessageChannel(reader)
    var consumed = 0
    var messages = 0
    // At most eight messages: enough for framing (a message after a message, one cut
    // short); every decoder runs on each, so long inputs made the target ~10x slower.
    while consumed < bytes.count && messages < 8 {
        messages += 1
        guard let message = try? channel.receive(until: .now) else { break }
        consumed += MessageHeader.size + message.payload.count
        message.closeDescriptors()
        decodeAll(message.payload)
    }
    drain(reader.fileDescriptor)
    return 0
}

/// Reads and discards what is left of this input, so the next one starts on a clean stream.
func drain(_ fd: Int32) {
    withUnsafeTemporaryAllocation(byteCount: 8192, alignment: 16) { scratch in
        while recv(fd, scratch.baseAddress, scratch.count, Int32(MSG_DONTWAIT)) > 0 {}
    }
}

func decodeAll(_ p: [UInt8]) {
    func roundTrip<T: WirePayload>(_: T.Type) {
        if let v = try? T.decode(p) {
            fuzzCheck(
                v.encoded == p || T.self == VringFile.self || T.self == SingleMemoryRegion.self
                    || T.self == MemoryTable.self, "\(T.self) re-encodes differently")
        }
    }
    roundTrip(U64Payload.self)
    roundTrip(VringState.self)
    roundTrip(VringAddress.self)
    roundTrip(MemoryTable.self)
    roundTrip(SingleMemoryRegion.self)
    roundTrip(VringFile.self)
    roundTrip(ConfigSpace.self)
    _ = try? MessageHeader.decode(Array(p.prefix(MessageHeader.size)))
}
