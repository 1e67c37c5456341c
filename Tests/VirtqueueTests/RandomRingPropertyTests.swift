import PropertyBased
import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// Property tests: the other side writes random (and random-but-plausible) bytes into
/// every ring part it can reach, thousands of times. Nothing traps (R4), every segment the
/// device yields lies inside the shared region (R7), and the driver either stays valid or
/// breaks with a violation, never completing a request that was not in flight (R3, R6).
@Suite struct RandomRingPropertyTests {
    static let sizes = [1, 2, 4, 8, 16]

    // MARK: generators of hostile-but-plausible values

    static func address(_ rng: inout SplitMix, _ a: RingAttacker, tables: [UInt64]) -> UInt64 {
        let size = UInt64(a.pair.region.size)
        switch rng.next() % 20 {
        case 0..<9: return a.pair.guestBase + rng.next() % size
        case 9..<12: return a.regionEndGuest &- rng.next() % 64
        case 12..<15: return tables[Int(rng.next() % UInt64(tables.count))]
        case 15: return a.pair.guestBase &- rng.next() % 64
        default: return rng.next()
        }
    }

    static func length(_ rng: inout SplitMix, _ a: RingAttacker) -> UInt32 {
        switch rng.next() % 10 {
        case 0..<4: return UInt32(rng.next() % 257)
        case 4..<6: return UInt32(16 * (rng.next() % 20))
        case 6..<8: return UInt32(rng.next() % UInt64(a.pair.region.size + 64))
        default: return UInt32(truncatingIfNeeded: rng.next())
        }
    }

    /// One descriptor. `plausible` ones are mostly well-formed (so walks go deep, through
    /// indirect tables and long chains); the others are mostly hostile.
    static func descriptor(
        _ rng: inout SplitMix, _ a: RingAttacker, table: UnsafeMutableRawPointer, _ i: Int, entries: Int,
        tables: [UInt64], plausible: Bool
    ) {
        if plausible && rng.next() % 16 != 0 {
            var flags: UInt16 = rng.next() % 3 == 0 ? 0 : SplitLayout.flagNext
            if rng.next() % 4 == 0 { flags |= SplitLayout.flagWrite }
            var address = a.scratchGuest + rng.next() % 4096
            var length = UInt32(rng.next() % 512)
            if rng.next() % 6 == 0 {
                flags = SplitLayout.flagIndirect
                address = tables[2 + Int(rng.next() % UInt64(tables.count - 2))]
                length = UInt32(16 * (1 + rng.next() % 8))
            }
            RingAttacker.writeDescriptor(
                table, i, address: address, length: length, flags: flags,
                next: UInt16(rng.next() % UInt64(entries)))
            return
        }
        let flags: UInt16 =
            rng.next() % 10 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : UInt16(rng.next() % 8)
        let next: UInt16 =
            rng.next() % 4 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : UInt16(rng.next() % UInt64(entries))
        RingAttacker.writeDescriptor(
            table, i, address: address(&rng, a, tables: tables), length: length(&rng, a), flags: flags, next: next)
    }

    // MARK: device side

    @Test func randomDriverMemoryNeverYieldsASegmentOutsideTheRegion() async {
        // Outcome counts, to show the generators reach every path (not only early rejects).
        var ready = 0
        var rejected = 0
        var broken = 0
        var multiSegment = 0
        await propertyCheck(count: 2500, input: Gen.uint64()) { seed in
            var rng = SplitMix(seed: seed)
            let size = Self.sizes[Int(rng.next() % UInt64(Self.sizes.count))]
            let features = RingFeatures(
                eventIndex: rng.next() & 1 == 0, indirectDescriptors: rng.next() % 4 != 0)
            guard let pair = try? RingPair(queueSize: size, features: features, bounceBytesPerQueue: 128 * 1024)
            else {
                Issue.record("RingPair setup failed")
                return
            }
            let a = RingAttacker(pair)
            let tableArea = pair.region.base + a.scratchOffset + 64 * 1024
            let tableAreaGuest = a.guest(a.scratchOffset + 64 * 1024)
            let tables =
                [a.descriptorTableGuest, a.guest(a.placement.availOffset)]
                + (0..<8).map { tableAreaGuest + UInt64($0 * 16) }
            // The driver-written parts: plausible garbage, or (1 in 8) pure noise.
            if rng.next() % 8 == 0 {
                rng.fill(a.descriptors, count: SplitLayout.descriptorTableSize(size))
                rng.fill(a.avail, count: SplitLayout.availRingSize(size))
                rng.fill(tableArea, count: 64 * 16)
            } else {
                let plausible = rng.next() & 1 == 0
                for i in 0..<size {
                    Self.descriptor(
                        &rng, a, table: a.descriptors, i, entries: size, tables: tables, plausible: plausible)
                }
                for i in 0..<64 {
                    Self.descriptor(&rng, a, table: tableArea, i, entries: 8, tables: tables, plausible: plausible)
                }
                for i in 0..<size {
                    let head =
                        rng.next() % 8 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : UInt16(rng.next() % UInt64(size))
                    a.setAvailEntry(slot: i, head: head)
                }
                let idx =
                    rng.next() % 4 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : UInt16(rng.next() % UInt64(size + 1))
                a.setAvailIndex(idx)
                a.setAvailFlags(UInt16(truncatingIfNeeded: rng.next()))
                a.setUsedEvent(UInt16(truncatingIfNeeded: rng.next()))
            }
            let device = pair.device
            let lo = UInt(bitPattern: pair.region.base)
            let hi = lo + UInt(pair.region.size)
            var chain = DescriptorChain()
            var outside = 0
            var inconsistent = 0
            for _ in 0..<(size + 2) {
                let fetch: ChainFetch
                do throws(Violation) {
                    fetch = try device.nextChain(into: &chain, memory: pair.memory)
                } catch {
                    #expect(device.isBroken && device.violation == error)
                    #expect(throws: error) { try device.nextChain(into: &chain, memory: pair.memory) }
                    broken += 1
                    break
                }
                if fetch == .empty { break }
                if case .rejected(let head, _) = fetch {
                    #expect(Int(head) < size)
                    rejected += 1
                    device.complete(head: head, length: 0)
                    continue
                }
                #expect(Int(chain.head) < size)
                ready += 1
                if chain.segments.count > 1 { multiSegment += 1 }
                var readable: UInt64 = 0
                var writable: UInt64 = 0
                for (k, s) in chain.segments.enumerated() {
                    let base = UInt(bitPattern: s.buffer.baseAddress)
                    if base < lo || base + UInt(s.buffer.count) > hi || (s.buffer.count == 0 && base >= hi) {
                        outside += 1
                    }
                    if base != lo + UInt(s.guestAddress &- pair.guestBase) { inconsistent += 1 }
                    if s.deviceWritable != (k >= chain.firstWritable) { inconsistent += 1 }
                    if s.deviceWritable {
                        writable += UInt64(s.buffer.count)
                    } else {
                        readable += UInt64(s.buffer.count)
                    }
                }
                if readable != chain.readableLength || writable != chain.writableLength { inconsistent += 1 }
                if readable + writable > UInt64(UInt32.max) { inconsistent += 1 }
                if chain.segments.count > 2 * size + 16 { inconsistent += 1 }
                device.complete(head: chain.head, length: UInt32(writable))
            }
            _ = device.publishUsed()
            _ = device.enableNotifications()
            #expect(outside == 0)
            #expect(inconsistent == 0)
        }
        #expect(
            ready > 500 && rejected > 500 && broken > 100 && multiSegment > 50,
            "\(ready) \(rejected) \(broken) \(multiSegment)")
    }

    // MARK: driver side

    @Test func randomUsedRingNeverCompletesARequestThatWasNotInFlight() async {
        var completions = 0
        var violations = 0
        await propertyCheck(count: 1500, input: Gen.uint64()) { seed in
            var rng = SplitMix(seed: seed)
            let size = Self.sizes[Int(rng.next() % UInt64(Self.sizes.count))]
            let features = RingFeatures(eventIndex: rng.next() & 1 == 0, indirectDescriptors: rng.next() & 1 == 0)
            guard
                let pair = try? RingPair(
                    queueSize: size, features: features, indirectEntries: 4, bounceBytesPerQueue: 256 * 1024)
            else {
                Issue.record("RingPair setup failed")
                return
            }
            let a = RingAttacker(pair)
            let driver = pair.driver
            // Private model of what is in flight: head -> (token, writable, descriptors).
            var model: [UInt16: (token: UInt64, writable: UInt64, descriptors: Int)] = [:]
            var nextToken: UInt64 = 1
            var bad = 0
            for _ in 0..<6 {
                // Post a few requests.
                let wanted = Int(rng.next() % UInt64(size + 1))
                for _ in 0..<wanted {
                    let count = 1 + Int(rng.next() % 4)
                    let readable = Int(rng.next() % UInt64(count + 1))
                    var segments: [Segment] = []
                    var writable: UInt64 = 0
                    for k in 0..<count {
                        let n = Int(rng.next() % 200)
                        guard let slice = pair.pool.allocate(max(1, n)) else { break }
                        let w = k >= readable
                        segments.append(pair.pool.segment(slice, length: n, deviceWritable: w))
                        if w { writable += UInt64(n) }
                    }
                    if segments.isEmpty { break }
                    let indirect = features.indirectDescriptors && segments.count > 1 && segments.count <= 4
                    do {
                        let head = try driver.add(segments, token: nextToken)
                        if model[head] != nil { bad += 1 }
                        model[head] = (nextToken, writable, indirect ? 1 : segments.count)
                        nextToken += 1
                    } catch SubmitError.full {
                        break
                    } catch SubmitError.tooManySegments(let n) {
                        if indirect || n <= size || n != segments.count { bad += 1 }
                    } catch {
                        bad += 1
                    }
                }
                _ = driver.publish()
                // The device rewrites whatever the driver wrote (R1: irrelevant to the driver)...
                if rng.next() & 1 == 0 {
                    rng.fill(a.descriptors, count: SplitLayout.descriptorTableSize(size))
                    rng.fill(a.avail, count: SplitLayout.availRingSize(size))
                    rng.fill(a.indirect, count: size * 4 * SplitLayout.descriptorSize)
                }
                // ...and writes a hostile used ring.
                let heads = Array(model.keys)
                let m = Int(rng.next() % UInt64(heads.count + 2))
                for j in 0..<max(m, 1) {
                    let id: UInt32
                    switch rng.next() % 8 {
                    case 0..<5 where !heads.isEmpty: id = UInt32(heads[Int(rng.next() % UInt64(heads.count))])
                    case 5: id = UInt32(rng.next() % UInt64(size))
                    default: id = UInt32(truncatingIfNeeded: rng.next())
                    }
                    let limit = model[UInt16(truncatingIfNeeded: id)]?.writable ?? 64
                    let len: UInt32
                    switch rng.next() % 6 {
                    case 0..<3: len = UInt32(rng.next() % (limit + 1))
                    case 3: len = UInt32(truncatingIfNeeded: limit + 1)
                    default: len = UInt32(truncatingIfNeeded: rng.next())
                    }
                    a.writeUsed(slot: Int(driver.lastUsed &+ UInt16(j)), id: id, length: len)
                }
                let idx = rng.next() % 5 == 0 ? UInt16(truncatingIfNeeded: rng.next()) : driver.lastUsed &+ UInt16(m)
                a.setUsedIndex(idx)
                a.setAvailEvent(UInt16(truncatingIfNeeded: rng.next()))
                // Poll: every completion must match the model exactly.
                for _ in 0..<(size + 2) {
                    do throws(Violation) {
                        guard let c = try driver.nextCompletion() else { break }
                        guard let r = model[c.head], r.token == c.token, UInt64(c.length) <= r.writable else {
                            bad += 1
                            break
                        }
                        model[c.head] = nil
                        completions += 1
                    } catch {
                        violations += 1
                        if !driver.isBroken || driver.violation != error { bad += 1 }
                        if driver.failAll().sorted() != model.values.map(\.token).sorted() { bad += 1 }
                        driver.reset()
                        model = [:]
                        break
                    }
                }
                if driver.inFlightCount != model.count { bad += 1 }
                let descriptorsInFlight = model.values.reduce(0) { $0 + $1.descriptors }
                if !driver.isBroken && driver.freeCount != size - descriptorsInFlight {
                    bad += 1
                }
                _ = driver.enableInterrupts()
            }
            #expect(bad == 0)
        }
        #expect(completions > 1000 && violations > 500, "\(completions) \(violations)")
    }
}
