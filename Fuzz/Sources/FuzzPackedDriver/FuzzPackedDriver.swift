import FuzzSupport
import RingTestSupport
import SharedMemory
import Virtqueue

/// The packed driver's used-descriptor processing with the fuzzer as the device: it posts
/// requests, then the fuzzer's bytes land on the descriptor ring (from the driver's next
/// used slot on, with plausible used marks or raw) and on the device area.
/// Checked: no trap; every completion names an in-flight token with len <= its writable
/// bytes; once broken, the queue stays broken and `failAll` returns the rest; slots and
/// in-flight counts are conserved.
nonisolated(unsafe) let pair = try? PackedRingPair(
    queueSize: 16, features: RingFeatures(eventIndex: true, indirectDescriptors: true),
    indirectEntries: 4, bounceBytesPerQueue: 1 << 16)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let pair else { return 0 }
    var input = FuzzInput(data, size)
    let driver = pair.driver
    driver.reset()
    var inFlight: [UInt64: UInt64] = [:]  // token -> writable bytes
    var token: UInt64 = 0
    for _ in 0..<4 {
        let requests = Int(input.byte() % 8)
        for _ in 0..<requests {
            let segments = 1 + Int(input.byte() % 4)
            var list: [Segment] = []
            var writable: UInt64 = 0
            for s in 0..<segments {
                let length = UInt32(input.byte()) + 1
                let w = s == segments - 1 || input.byte() & 1 == 1
                if w { writable += UInt64(length) }
                list.append(Segment(address: pair.guestBase + 0x10000, length: length, deviceWritable: w))
            }
            token += 1
            do {
                try driver.add(list, token: token)
                inFlight[token] = writable
            } catch {}
        }
        _ = driver.publish()
        if driver.isBroken {
            fuzzCheck(Set(driver.failAll()) == Set(inFlight.keys), "failAll after publish broke")
            return 0
        }
        // The device writes used descriptors from the driver's next used slot on.
        let (start, wrap) = driver.lastUsed
        let count = Int(input.byte() % 17)
        for j in 0..<count {
            let slot = (Int(start) + j) % 16
            let mode = input.byte()
            let d = pair.descriptor(slot)
            if mode & 3 == 0 {
                input.copy(into: d, count: 16)
            } else {
                let flags: UInt16 =
                    mode & 4 == 0 ? PackedLayout.usedMarker(wrap: slot < Int(start) ? !wrap : wrap) : input.integer()
                pair.writeDescriptor(
                    slot, length: mode & 8 == 0 ? UInt32(input.byte()) : input.integer(), id: UInt16(input.byte() % 20),
                    flags: flags)
            }
        }
        input.copy(into: pair.deviceArea(), count: Int(input.byte() % 5))
        for _ in 0..<40 {
            do {
                guard let c = try driver.nextCompletion() else { break }
                let posted = inFlight.removeValue(forKey: c.token)
                fuzzCheck(posted != nil, "completion for token \(c.token) that is not in flight")
                fuzzCheck(UInt64(c.length) <= posted ?? 0, "len \(c.length) beyond writable")
            } catch {
                fuzzCheck(driver.isBroken, "threw \(error) but not broken")
                let failed = Set(driver.failAll())
                fuzzCheck(failed == Set(inFlight.keys), "failAll returned \(failed), in flight \(inFlight.keys)")
                do {
                    _ = try driver.nextCompletion()
                    fuzzCheck(false, "broken queue completed again")
                } catch {
                    fuzzCheck(error == driver.violation, "violation changed")
                }
                return 0
            }
        }
        fuzzCheck(driver.inFlightCount == inFlight.count, "in-flight count drifted")
        fuzzCheck(driver.freeCount <= 16 && (inFlight.isEmpty == (driver.freeCount == 16)), "slot count drifted")
        _ = driver.enableInterrupts()
    }
    return 0
}
