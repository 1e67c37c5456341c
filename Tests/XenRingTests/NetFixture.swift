import SharedMemory
import Testing
@testable import XenRing

/// One in-process netfront/netback pair on its own grant table and frames (two sealed
/// memfds): frame 0 is the tx ring, frame 1 the rx ring, then rx pages, then tx pages.
/// Helpers play a malicious peer by writing a ring by hand.
final class NetPair {
    let table: SharedRegion
    let frames: SharedRegion
    let memory: GrantTableMemory
    let issuer: GrantIssuer
    let front: NetFrontend
    let back: NetBackend
    var delivered: [[UInt8]] = []

    init(frameCount: Int = 2 + 64 + 64, rxPages: Int? = nil) throws {
        table = try SharedRegion(name: "xen-net-grants", size: 4096)
        frames = try SharedRegion(name: "xen-net-frames", size: frameCount * 4096)
        memory = GrantTableMemory(entries: table.base, entryCount: 512, frames: frames.base, frameCount: frameCount)
        issuer = GrantIssuer(memory: memory)
        front = NetFrontend(memory: NetFrontendMemory(grants: memory), grants: issuer, rxPages: rxPages)
        back = NetBackend(txRing: memory.page(0), rxRing: memory.page(1), mapper: GrantMapper(memory: memory))
    }

    var txRing: UnsafeMutableRawPointer { memory.page(0) }
    var rxRing: UnsafeMutableRawPointer { memory.page(1) }

    func txSlot(_ index: UInt32) -> UnsafeMutableRawPointer {
        txRing + SharedRingLayout.headerSize + Int(index & 255) * NetifLayout.txSlotSize
    }

    func rxSlot(_ index: UInt32) -> UnsafeMutableRawPointer {
        rxRing + SharedRingLayout.headerSize + Int(index & 255) * NetifLayout.rxSlotSize
    }

    // MARK: malicious backend

    func writeTxResponse(slot index: UInt32, id: UInt16, status: Int16) {
        txSlot(index).storeBytes(of: UInt32(id) | UInt32(UInt16(bitPattern: status)) << 16, as: UInt32.self)
    }

    func writeRxResponse(slot index: UInt32, id: UInt16, offset: UInt16 = 0, flags: UInt16 = 0, status: Int16) {
        let s = rxSlot(index)
        s.storeBytes(of: id, toByteOffset: 0, as: UInt16.self)
        s.storeBytes(of: offset, toByteOffset: 2, as: UInt16.self)
        s.storeBytes(of: flags, toByteOffset: 4, as: UInt16.self)
        s.storeBytes(of: status, toByteOffset: 6, as: Int16.self)
    }

    func writeRxExtra(slot index: UInt32, type: UInt8, flags: UInt8 = 0, gsoSize: UInt16 = 1448, gsoType: UInt8 = 1) {
        let s = rxSlot(index)
        s.storeBytes(of: type, toByteOffset: 0, as: UInt8.self)
        s.storeBytes(of: flags, toByteOffset: 1, as: UInt8.self)
        s.storeBytes(of: gsoSize, toByteOffset: 2, as: UInt16.self)
        s.storeBytes(of: gsoType, toByteOffset: 4, as: UInt8.self)
        s.storeBytes(of: UInt8(0), toByteOffset: 5, as: UInt8.self)
        s.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
    }

    func setTxResponseProducer(_ value: UInt32) {
        SharedAccess.store32Release(txRing + SharedRingLayout.responseProducer, value)
    }

    func setRxResponseProducer(_ value: UInt32) {
        SharedAccess.store32Release(rxRing + SharedRingLayout.responseProducer, value)
    }

    /// The grant ref the frontend put in rx request `index` (read as the backend would).
    func rxRequestRef(_ index: UInt32) -> UInt32 { rxSlot(index).load(fromByteOffset: 4, as: UInt32.self) }
    func txRequestRef(_ index: UInt32) -> UInt32 { txSlot(index).load(as: UInt32.self) }

    // MARK: malicious frontend

    func writeTxRequest(
        slot index: UInt32, ref: UInt32, offset: UInt16 = 0, flags: UInt16 = 0, id: UInt16, size: UInt16
    ) {
        let s = txSlot(index)
        s.storeBytes(of: ref, toByteOffset: 0, as: UInt32.self)
        s.storeBytes(of: offset, toByteOffset: 4, as: UInt16.self)
        s.storeBytes(of: flags, toByteOffset: 6, as: UInt16.self)
        s.storeBytes(of: id, toByteOffset: 8, as: UInt16.self)
        s.storeBytes(of: size, toByteOffset: 10, as: UInt16.self)
    }

    func writeTxExtra(slot index: UInt32, type: UInt8, flags: UInt8 = 0, gsoSize: UInt16 = 1448, gsoType: UInt8 = 1) {
        let s = txSlot(index)
        s.initializeMemory(as: UInt8.self, repeating: 0, count: 12)
        s.storeBytes(of: type, toByteOffset: 0, as: UInt8.self)
        s.storeBytes(of: flags, toByteOffset: 1, as: UInt8.self)
        s.storeBytes(of: gsoSize, toByteOffset: 2, as: UInt16.self)
        s.storeBytes(of: gsoType, toByteOffset: 4, as: UInt8.self)
    }

    func setTxRequestProducer(_ value: UInt32) {
        SharedAccess.store32Release(txRing + SharedRingLayout.requestProducer, value)
    }

    func txResponse(_ index: UInt32) -> (id: UInt16, status: Int16) {
        let w = txSlot(index).load(as: UInt32.self)
        return (UInt16(truncatingIfNeeded: w), Int16(bitPattern: UInt16(truncatingIfNeeded: w >> 16)))
    }

    func grantByHand(ref: UInt32, frame: UInt32, flags: UInt16) {
        let e = table.base + Int(ref) * 8
        e.storeBytes(of: UInt16(0), toByteOffset: 2, as: UInt16.self)
        e.storeBytes(of: frame, toByteOffset: 4, as: UInt32.self)
        e.storeBytes(of: flags, toByteOffset: 0, as: UInt16.self)
    }

    // MARK: honest traffic

    /// The honest backend takes every published tx frame (recorded in `delivered`).
    func serveTx() throws {
        _ = try back.serveTx(budget: 256) { delivered.append(Array($0.bytes)) }
        _ = back.publishResponses()
    }

    /// One frame each way through the honest backend, checked byte for byte.
    func roundTrip(size: Int = 1500, seed: UInt8 = 3) throws -> Bool {
        let data = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
        try data.withUnsafeBytes { try front.submit(frame: $0, token: 42) }
        _ = front.publishTx()
        delivered = []
        try serveTx()
        guard try front.nextTxCompletion() == NetTxCompletion(token: 42, status: .okay), delivered == [data] else {
            return false
        }
        front.refillRx()
        _ = front.publishRx()
        guard case .sent = try data.withUnsafeBytes({ try back.send($0) }) else { return false }
        _ = back.publishResponses()
        var received = [UInt8](repeating: 0, count: 65536)
        guard let frame = try received.withUnsafeMutableBytes({ try front.nextReceived(into: $0) }),
            frame.status == .okay
        else { return false }
        return Array(received[0..<frame.length]) == data
    }
}

/// The R6 contract for netfront: the violation is sticky, submits fail with it, the
/// rings stay silent, `failAll` hands back exactly the frames in flight, another device
/// (`other`) is untouched.
func expectNetDisabled(
    _ pair: NetPair, _ v: XenViolation, inFlight: [UInt64], other: NetPair,
    sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let f = pair.front
    #expect(f.isBroken, sourceLocation: sourceLocation)
    #expect(f.violation == v, sourceLocation: sourceLocation)
    #expect(throws: v, sourceLocation: sourceLocation) { try f.nextTxCompletion() }
    var buffer = [UInt8](repeating: 0, count: 64)
    #expect(throws: v, sourceLocation: sourceLocation) {
        try buffer.withUnsafeMutableBytes { try f.nextReceived(into: $0) }
    }
    #expect(throws: NetSubmitError.broken(v), sourceLocation: sourceLocation) {
        try [UInt8](repeating: 1, count: 60).withUnsafeBytes { try f.submit(frame: $0, token: 99) }
    }
    #expect(f.publishTx() == false, sourceLocation: sourceLocation)
    #expect(f.refillRx() == 0, sourceLocation: sourceLocation)
    #expect(f.enableNotifications() == false, sourceLocation: sourceLocation)
    #expect(f.failAll().sorted() == inFlight.sorted(), sourceLocation: sourceLocation)
    #expect(f.failAll() == [], sourceLocation: sourceLocation)
    #expect(f.txFramesInFlight == 0 && f.rxPosted == 0, sourceLocation: sourceLocation)
    #expect(try other.roundTrip(), sourceLocation: sourceLocation)
}
