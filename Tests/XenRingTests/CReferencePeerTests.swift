import CXenPeer
import SharedMemory
import RingTestSupport
import Testing
@testable import XenRing

/// Compatibility with a real reference: the C peer in Tests/CXenPeer is built only on
/// libxen-dev's ring.h/blkif.h macros. Our frontend drives its backend, and our backend
/// serves its frontend, over shared memory and eventfds.
@Suite struct CReferencePeerTests {
    struct Shared {
        let pair: XenPair
        let toBack: Notifier
        let toFront: Notifier
        init() throws {
            pair = try XenPair()
            toBack = try Notifier()
            toFront = try Notifier()
        }
        /// The environment as seen by the C side (`evt_to_peer` is whom it signals).
        func env(asBackend: Bool) -> cxen_env {
            cxen_env(
                sring: pair.ring, gnttab: pair.table.base, gnttab_entries: 512, frames: pair.frames.base,
                nr_frames: 64, evt_to_peer: asBackend ? toFront.fileDescriptor : toBack.fileDescriptor,
                evt_from_peer: asBackend ? toBack.fileDescriptor : toFront.fileDescriptor)
        }
    }

    /// Our hardened frontend against the C backend (BACK_RING_INIT, RING_COPY_REQUEST,
    /// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_REQUESTS).
    @Test func hardenedFrontendDrivesCBackend() throws {
        let s = try Shared()
        let disk = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048 * 512, alignment: 4096)
        defer { disk.deallocate() }
        disk.initializeMemory(as: UInt8.self, repeating: 0)
        let env = UnsafeSendable(s.env(asBackend: true))
        let diskAddress = UInt(bitPattern: disk.baseAddress)
        let requests = 2 * 40 + 1
        let answered = UnsafeMutablePointer<Int>.allocate(capacity: 1)
        defer { answered.deallocate() }
        let answeredAddress = UInt(bitPattern: answered)
        let thread = TestThread {
            var e = env.value
            let n = cxen_back_serve(&e, UnsafeMutablePointer(bitPattern: diskAddress), 2048, UInt64(requests), 5000)
            UnsafeMutablePointer<Int>(bitPattern: answeredAddress)?.pointee = n
        }
        let events = EventChannel(incoming: s.toFront, outgoing: s.toBack)
        let front = s.pair.front
        func wait(_ token: UInt64) throws -> BlkCompletion {
            if front.publish() { events.notify() }
            let deadline = Deadline.after(seconds: 5)
            while true {
                if let c = try front.nextCompletion() {
                    #expect(c.token == token)
                    return c
                }
                if front.enableNotifications() { continue }
                #expect(events.wait(until: deadline))
                if deadline.hasPassed { throw XenViolation.deadlineExceeded(milliseconds: 5000) }
            }
        }
        // 40 rounds of a multi-segment write and read back (3 pages, last one partial).
        for round in 0..<40 {
            let data = (0..<(2 * 4096 + 1024)).map { UInt8(truncatingIfNeeded: $0 &* 3 &+ round) }
            let sector = UInt64(round * 24)
            try data.withUnsafeBytes { _ = try front.submitWrite(sector: sector, from: $0, token: UInt64(round)) }
            #expect(try wait(UInt64(round)).status == .okay)
            var back = [UInt8](repeating: 0, count: data.count)
            try back.withUnsafeMutableBytes { _ = try front.submitRead(sector: sector, into: $0, token: 1000) }
            #expect(try wait(1000).status == .okay)
            #expect(back == data)
            #expect(
                Array(UnsafeRawBufferPointer(rebasing: disk[(Int(sector) * 512)..<(Int(sector) * 512 + data.count)]))
                    == data)
        }
        _ = try front.submitFlush(token: 5)
        #expect(try wait(5).status == .okay)
        thread.join()
        #expect(answered.pointee == requests)
        #expect(s.pair.issuer.quarantined.isEmpty)
        #expect(!front.isBroken)
    }

    /// The C reference frontend (SHARED_RING_INIT, FRONT_RING_INIT, RING_GET_REQUEST,
    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_RESPONSES) against our
    /// hardened backend: every request is answered OKAY and the data lands on disk.
    @Test func cFrontendIsServedByHardenedBackend() throws {
        let s = try Shared()
        let env = UnsafeSendable(s.env(asBackend: false))
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { data.deallocate() }
        for i in 0..<4096 { data[i] = UInt8(truncatingIfNeeded: i &* 11) }
        let dataAddress = UInt(bitPattern: data.baseAddress)
        let result = UnsafeMutablePointer<(Int, UInt64)>.allocate(capacity: 1)
        defer { result.deallocate() }
        result.initialize(to: (0, 0))
        let resultAddress = UInt(bitPattern: result)
        // The C frontend initialises the shared ring itself (SHARED_RING_INIT).
        let thread = TestThread {
            var e = env.value
            var errors: UInt64 = 0
            let n = cxen_front_run(
                &e, 100, 1, 500, 8, 1, 2048, UnsafeMutablePointer(bitPattern: dataAddress), 5000, &errors)
            UnsafeMutablePointer<(Int, UInt64)>(bitPattern: resultAddress)?.pointee = (n, errors)
        }
        let backend = s.pair.back
        let events = EventChannel(incoming: s.toBack, outgoing: s.toFront)
        let deadline = Deadline.after(seconds: 10)
        while backend.servedRequests < 500 && !deadline.hasPassed {
            let n = try backend.serve(budget: 32)
            if n > 0 {
                if backend.publishResponses() { events.notify() }
                continue
            }
            if backend.enableNotifications() { continue }
            _ = events.wait(until: .after(seconds: 1))
        }
        thread.join()
        #expect(result.pointee.0 == 500)
        #expect(result.pointee.1 == 0)
        #expect(backend.rejectedRequests == 0)
        s.pair.storage.withBytes { disk in
            #expect(Array(disk[0..<4096]) == Array(data))
            #expect(Array(disk[(100 * 4096)..<(101 * 4096)]) == Array(data))
        }
    }
}
