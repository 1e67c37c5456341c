import FuzzSupport
import VirtioFS

/// Every FUSE reply check of the virtio-fs driver on the fuzzer's bytes, as the driver
/// meets them after its one private copy: the header check (any used length, any unique),
/// the entry, attribute, INIT and config validators, and READDIRPLUS parsing. Checked: no
/// trap; whatever passes keeps the promises the driver relies on (a body inside the used
/// length, names of 1...255 bytes without '/' or NUL, no nodeid 0 or 1, sizes that fit
/// Int64, offsets never repeated within a listing).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    var input = FuzzInput(data, size)
    let usedLength = UInt32(input.integer(UInt16.self))
    let unique = UInt64(input.byte())
    let reply = Array(input.view(min(input.remaining, 64 << 10)))

    if let checked = try? FSReply.checkHeader(reply, usedLength: usedLength, unique: unique) {
        fuzzCheck(checked.error <= 0 && checked.error > -4096, "error \(checked.error) passed")
        fuzzCheck(checked.body.count + 16 == Int(usedLength), "body outside the used length")
        fuzzCheck(checked.error == 0 || checked.body.isEmpty, "error reply with a body passed")
    }

    var r = FuseReader(reply)
    if let e = try? FSReply.entry(&r, opcode: "LOOKUP", zeroMeansAbsent: true) {
        fuzzCheck(e.nodeID > 1, "entry nodeid \(e.nodeID) passed")
        fuzzCheck(e.attributes.size >= 0, "negative size")
    }
    var a = FuseReader(reply)
    if let attr = FuseAttr.decode(&a), let v = try? FileAttributes.validate(attr, nodeID: 5) {
        fuzzCheck(FuseProtocol.FileType(mode: v.type.rawValue) != nil, "no file type")
    }
    var i = FuseReader(reply)
    if let out = FuseInitOut.decode(&i), let v = try? FSInfo.validateInit(out) {
        fuzzCheck(v.maxWrite >= 4096 && v.maxWrite <= FSInfo.transferCap, "max_write \(v.maxWrite) not clamped")
        fuzzCheck(v.maxPages >= 1 && v.maxPages <= 256, "max_pages \(v.maxPages) not clamped")
    }
    if let v = try? FSInfo.validateConfig(FSConfig.decode(reply), backendQueues: 3, requestedQueues: 8) {
        fuzzCheck(!v.tag.isEmpty && !v.tag.utf8.contains(where: { $0 < 0x20 }), "tag \(v.tag.debugDescription) passed")
        fuzzCheck(v.requestQueues >= 1 && v.requestQueues <= 2, "queues \(v.requestQueues) not clamped")
    }

    var seen = Set<UInt64>()
    if let listing = try? FSReply.directoryPlus(reply[...], seen: &seen) {
        for d in listing.entries {
            let name = Array(d.name.utf8)
            fuzzCheck(!name.isEmpty && name.count <= 255 * 3, "name length \(name.count)")
            fuzzCheck(!name.contains(0x2f) && !name.contains(0), "name \(d.name.debugDescription) passed")
            fuzzCheck(d.name != "." && d.name != "..", "dot entry returned")
            fuzzCheck(d.entry.nodeID > 1, "nodeid \(d.entry.nodeID) passed")
        }
        fuzzCheck(seen.count >= listing.entries.count, "offsets repeated")
    }
    return 0
}
