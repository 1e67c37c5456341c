import FuzzSupport
import SharedMemory
import VhostUser

/// vhost-user message decoding as either side meets it: the fuzzer's bytes are written
/// to one end of a socket pair and read back by `MessageChannel.receive` (header check,
/// size bound before the body), then every payload decoder runs on the body. Checked: no
/// trap, a decoded payload re-encodes to the same bytes. (Before the write side was shut
/// down after the input, a message cut short waited out a 1 ms poll: 2.7k inputs/s.)
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    // A fresh pair per input: nothing left over from the previous one.
    guard let (writer, reader) = try? UnixChannel.pair() else { return 0 }
    var input = FuzzInput(data, size)
    let bytes = input.take(min(size, 8192))  // a few messages; the largest (12 + 4096 bytes) fits
    do { try writer.send(bytes) } catch { return 0 }
    // End of input is end of stream: a message cut short reads as a closed peer at once,
    // instead of waiting out the (millisecond-granular) deadline for bytes that never come.
    writer.shutdown()
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
    return 0
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
