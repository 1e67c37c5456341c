import SharedMemory
import Testing
@testable import XenRing

/// One in-process frontend/backend pair on its own grant table and frames (two sealed
/// memfds), with helpers to play a malicious peer by writing the ring by hand.
final class XenPair {
    let table: SharedRegion
    let frames: SharedRegion
    let memory: GrantTableMemory
    let issuer: GrantIssuer
    let front: BlkFrontend
    let storage: MemoryStorage
    let back: BlkBackend

    init(frameCount: Int = 64, sectors: Int = 2048) throws {
        table = try SharedRegion(name: "xen-grants", size: 4096)
        frames = try SharedRegion(name: "xen-frames", size: frameCount * 4096)
        memory = GrantTableMemory(entries: table.base, entryCount: 512, frames: frames.base, frameCount: frameCount)
        issuer = GrantIssuer(memory: memory)
        storage = MemoryStorage(sectors: sectors)
        front = BlkFrontend(memory: BlkFrontendMemory(grants: memory), grants: issuer, capacitySectors: UInt64(sectors))
        back = BlkBackend(ring: memory.page(0), mapper: GrantMapper(memory: memory), storage: storage)
    }

    var ring: UnsafeMutableRawPointer { memory.page(0) }

    func slot(_ index: UInt32) -> UnsafeMutableRawPointer {
        ring + SharedRingLayout.headerSize + Int(index & 31) * BlkifLayout.slotSize
    }

    /// Malicious backend: writes a response slot by hand.
    func writeResponse(slot index: UInt32, id: UInt64, operation: UInt8, status: Int16) {
        let s = slot(index)
        s.storeBytes(of: id, toByteOffset: 0, as: UInt64.self)
        s.storeBytes(of: operation, toByteOffset: 8, as: UInt8.self)
        s.storeBytes(of: status, toByteOffset: 10, as: Int16.self)
    }

    func setResponseProducer(_ value: UInt32) {
        SharedAccess.store32Release(ring + SharedRingLayout.responseProducer, value)
    }

    var requestProducer: UInt32 { SharedAccess.load32(ring + SharedRingLayout.requestProducer) }

    /// Malicious frontend: writes a raw request into slot `index` and publishes it.
    func writeRequest(
        slot index: UInt32, operation: UInt8, id: UInt64, sector: UInt64, segments: [(UInt32, UInt8, UInt8)],
        count: UInt8? = nil
    ) {
        let s = slot(index)
        s.initializeMemory(as: UInt8.self, repeating: 0, count: BlkifLayout.requestSize)
        s.storeBytes(of: operation, toByteOffset: 0, as: UInt8.self)
        s.storeBytes(of: count ?? UInt8(segments.count), toByteOffset: 1, as: UInt8.self)
        s.storeBytes(of: id, toByteOffset: 8, as: UInt64.self)
        s.storeBytes(of: sector, toByteOffset: 16, as: UInt64.self)
        for (i, seg) in segments.prefix(11).enumerated() {
            s.storeBytes(of: seg.0, toByteOffset: 24 + 8 * i, as: UInt32.self)
            s.storeBytes(of: seg.1, toByteOffset: 28 + 8 * i, as: UInt8.self)
            s.storeBytes(of: seg.2, toByteOffset: 29 + 8 * i, as: UInt8.self)
        }
    }

    /// Malicious frontend: grants `frame` by hand.
    func grantByHand(ref: UInt32, frame: UInt32, flags: UInt16) {
        let e = table.base + Int(ref) * 8
        e.storeBytes(of: UInt16(0), toByteOffset: 2, as: UInt16.self)
        e.storeBytes(of: frame, toByteOffset: 4, as: UInt32.self)
        e.storeBytes(of: flags, toByteOffset: 0, as: UInt16.self)
    }

    func grantFlags(_ ref: UInt32) -> UInt16 { table.base.load(fromByteOffset: Int(ref) * 8, as: UInt16.self) }

    /// Lets the honest backend answer everything published.
    func serveAll() throws {
        _ = try back.serve(budget: 64)
        _ = back.publishResponses()
    }

    /// A full write + read-back of one page through the honest backend.
    func roundTrip(sector: UInt64 = 8, seed: UInt8 = 7) throws -> Bool {
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ Int(seed)) }
        try data.withUnsafeBytes { _ = try front.submitWrite(sector: sector, from: $0, token: 1) }
        _ = front.publish()
        try serveAll()
        guard let w = try front.nextCompletion(), w.status == .okay else { return false }
        var back = [UInt8](repeating: 0, count: 4096)
        try back.withUnsafeMutableBytes { _ = try front.submitRead(sector: sector, into: $0, token: 2) }
        _ = front.publish()
        try serveAll()
        guard let r = try front.nextCompletion(), r.status == .okay else { return false }
        return back == data
    }
}

/// The R6 contract: the violation is sticky, submits fail with it, `failAll` hands back
/// exactly the in-flight tokens, and another device (`other`) is untouched.
func expectDisabled(
    _ pair: XenPair, _ v: XenViolation, inFlight: [UInt64], other: XenPair,
    sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let f = pair.front
    #expect(f.isBroken, sourceLocation: sourceLocation)
    #expect(f.violation == v, sourceLocation: sourceLocation)
    #expect(throws: v, sourceLocation: sourceLocation) { try f.nextCompletion() }
    #expect(throws: BlkSubmitError.broken(v), sourceLocation: sourceLocation) { try f.submitFlush(token: 99) }
    #expect(f.publish() == false, sourceLocation: sourceLocation)
    #expect(f.enableNotifications() == false, sourceLocation: sourceLocation)
    #expect(f.failAll().sorted() == inFlight.sorted(), sourceLocation: sourceLocation)
    #expect(f.failAll() == [], sourceLocation: sourceLocation)
    #expect(f.inFlightCount == 0, sourceLocation: sourceLocation)
    #expect(try other.roundTrip(), sourceLocation: sourceLocation)
}
