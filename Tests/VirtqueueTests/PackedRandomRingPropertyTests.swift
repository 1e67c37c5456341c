import PropertyBased
import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

/// Property tests for the packed ring: the other side writes random (and plausible) bytes
/// into the descriptor ring and its event suppression area. Nothing traps (R4), every
/// segment the device yields lies inside the shared region (R7), and the driver either
/// completes exactly what its private model has in flight or breaks with a violation.
@Suite struct PackedRandomRingPropertyTests {
    static let sizes = [1, 2, 3, 4, 8, 16]

    @Test func randomDriverRingNeverYieldsASegmentOutsideTheRegion() async {
        var ready = 0
        var rejected = 0
        var broken = 0
        await propertyCheck(count: 2000, input: Gen.uint64()) { seed in
            var rng = SplitMix(seed: seed)
            let size = Self.sizes[Int(rng.next() % UInt64(Self.sizes.count))]
            let features = RingFeatures(eventIndex: rng.next() & 1 == 0, indirectDescriptors: rng.next() % 4 != 0)
            guard let pair = try? PackedRingPair(queueSize: size, features: features, bounceBytesPerQueue: 64 * 1024)
            else {
                Issue.record("PackedRingPair setup failed")
                return
            }
            let guestSize = UInt64(pair.region.size)
            let tableArea = pair.region.base + pair.layout.queues[0].bounceOffset
            let tableGuest = pair.pool.guestAddress
            func address() -> UInt64 {
                switch rng.next() % 8 {
                case 0..<5: return pair.guestBase + rng.next() % guestSize
                case 5: return tableGuest + 16 * (rng.next() % 8)
                case 6: return pair.guestBase + guestSize &- rng.next() % 64
                default: return rng.next()
                }
            }
            func length() -> UInt32 {
                switch rng.next() % 4 {
                case 0, 1: return UInt32(rng.next() % 300)
                case 2: return UInt32(16 * (rng.next() % 8))
                default: return UInt32(truncatingIfNeeded: rng.next())
                }
            }
            func flags() -> UInt16 {
                var f = UInt16(truncatingIfNeeded: rng.next()) & 0x7
                switch rng.next() % 4 {
                case 0, 1: f |= PackedLayout.availableMarker(wrap: true)
                case 2: f |= PackedLayout.availableMarker(wrap: false)
                default: f |= UInt16(truncatingIfNeeded: rng.next()) & 0x8080
                }
                return f
            }
            for _ in 0..<3 {
                let mode = rng.next() % 6
                if mode == 0 {
                    rng.fill(pair.descriptor(0), count: PackedLayout.ringSize(size))
                    rng.fill(tableArea, count: 8 * 16)
                } else if mode < 3 {
                    // Plausible: mostly well-formed chains with distinct ids, some flaws.
                    for i in 0..<size {
                        let f =
                            (rng.next() % 3 == 0 ? PackedLayout.flagNext : 0)
                            | (rng.next() % 2 == 0 ? PackedLayout.flagWrite : 0)
                            | (rng.next() % 10 == 0 ? PackedLayout.flagIndirect : 0)
                            | PackedLayout.availableMarker(wrap: true)
                        let a = rng.next() % 10 == 0 ? address() : tableGuest + rng.next() % 4096
                        let l = rng.next() % 10 == 0 ? length() : UInt32(rng.next() % 256)
                        pair.writeDescriptor(i, address: a, length: l, id: UInt16(i), flags: f)
                    }
                    for i in 0..<8 {
                        let e = tableArea + 16 * i
                        SharedAccess.store64(e, tableGuest + rng.next() % 4096)
                        SharedAccess.store32(e + 8, UInt32(rng.next() % 256))
                        SharedAccess.store16(e + 14, rng.next() % 2 == 0 ? PackedLayout.flagWrite : 0)
                    }
                } else {
                    for i in 0..<size {
                        let id =
                            rng.next() % 6 == 0
                            ? UInt16(truncatingIfNeeded: rng.next()) : UInt16(rng.next() % UInt64(size))
                        pair.writeDescriptor(i, address: address(), length: length(), id: id, flags: flags())
                    }
                    for i in 0..<8 {
                        let e = tableArea + 16 * i
                        SharedAccess.store64(e, address())
                        SharedAccess.store32(e + 8, length())
                        SharedAccess.store16(e + 14, flags())
                    }
                }
                rng.fill(pair.driverArea(), count: 4)
                let device = pair.device
                let lo = UInt(bitPattern: pair.region.base)
                let hi = lo + UInt(pair.region.size)
                var chain = DescriptorChain()
                var bad = 0
                for _ in 0..<(size + 2) {
                    let fetch: ChainFetch
                    do throws(Violation) {
                        fetch = try device.nextChain(into: &chain, memory: pair.memory)
                    } catch {
                        if !(device.isBroken && device.violation == error) { bad += 1 }
                        broken += 1
                        break
                    }
                    if fetch == .empty { break }
                    if case .rejected(let id, _) = fetch {
                        if Int(id) >= size { bad += 1 }
                        rejected += 1
                        device.complete(head: id, length: 0)
                        continue
                    }
                    ready += 1
                    if Int(chain.head) >= size { bad += 1 }
                    var total: UInt64 = 0
                    for s in chain.segments {
                        let base = UInt(bitPattern: s.buffer.baseAddress)
                        if base < lo || base + UInt(s.buffer.count) > hi { bad += 1 }
                        total += UInt64(s.buffer.count)
                    }
                    if total != chain.readableLength + chain.writableLength || total > UInt64(UInt32.max) { bad += 1 }
                    device.complete(head: chain.head, length: UInt32(truncatingIfNeeded: chain.writableLength))
                }
                _ = device.publishUsed()
                _ = device.enableNotifications()
                #expect(bad == 0)
                if device.isBroken { break }
            }
        }
        #expect(ready > 300 && rejected > 300 && broken > 300, "\(ready) \(rejected) \(broken)")
    }

    @Test func randomUsedDescriptorsNeverCompleteARequestThatWasNotInFlight() async {
        var completions = 0
        var violations = 0
        await propertyCheck(count: 1500, input: Gen.uint64()) { seed in
            var rng = SplitMix(seed: seed)
            let size = Self.sizes[Int(rng.next() % UInt64(Self.sizes.count))]
            let features = RingFeatures(eventIndex: rng.next() & 1 == 0, indirectDescriptors: rng.next() & 1 == 0)
            guard
                let pair = try? PackedRingPair(
                    queueSize: size, features: features, indirectEntries: 4, bounceBytesPerQueue: 64 * 1024)
            else {
                Issue.record("PackedRingPair setup failed")
                return
            }
            let driver = pair.driver
            var model: [UInt16: (token: UInt64, writable: UInt64, slots: Int)] = [:]
            var nextToken: UInt64 = 1
            var bad = 0
            let slice = pair.pool.allocate(256)
            for _ in 0..<8 {
                let wanted = Int(rng.next() % UInt64(size + 1))
                for _ in 0..<wanted {
                    guard let slice else { break }
                    let count = 1 + Int(rng.next() % 4)
                    let readable = Int(rng.next() % UInt64(count + 1))
                    var writable: UInt64 = 0
                    let segments = (0..<count).map { k -> Segment in
                        let n = Int(rng.next() % 64)
                        if k >= readable { writable += UInt64(n) }
                        return pair.pool.segment(slice, offset: 0, length: n, deviceWritable: k >= readable)
                    }
                    let indirect = features.indirectDescriptors && count > 1
                    do {
                        let id = try driver.add(segments, token: nextToken)
                        if model[id] != nil { bad += 1 }
                        model[id] = (nextToken, writable, indirect ? 1 : count)
                        nextToken += 1
                    } catch SubmitError.full {
                        break
                    } catch SubmitError.tooManySegments {
                        if indirect || count <= size { bad += 1 }
                    } catch {
                        bad += 1
                    }
                }
                _ = driver.publish()
                // The device writes random used descriptors from the driver's next used slot
                // on (plausible ids and lengths, wrong wrap counters, noise), or noise everywhere.
                if rng.next() % 5 == 0 {
                    rng.fill(pair.descriptor(0), count: PackedLayout.ringSize(size))
                } else {
                    let ids = Array(model.keys)
                    let (start, wrap) = driver.lastUsed
                    for j in 0..<Int(rng.next() % UInt64(size + 1)) {
                        let slot = (Int(start) + j) % size
                        let id: UInt16
                        switch rng.next() % 8 {
                        case 0..<5 where !ids.isEmpty: id = ids[Int(rng.next() % UInt64(ids.count))]
                        case 5: id = UInt16(rng.next() % UInt64(size))
                        default: id = UInt16(truncatingIfNeeded: rng.next())
                        }
                        let limit = model[id]?.writable ?? 64
                        let len: UInt32 =
                            rng.next() % 4 == 0
                            ? UInt32(truncatingIfNeeded: rng.next()) : UInt32(rng.next() % (limit + 1))
                        let w = rng.next() % 6 == 0 ? !wrap : (slot < Int(start) ? !wrap : wrap)
                        let f: UInt16 =
                            rng.next() % 8 == 0
                            ? UInt16(truncatingIfNeeded: rng.next()) : PackedLayout.usedMarker(wrap: w)
                        pair.writeDescriptor(slot, length: len, id: id, flags: f)
                    }
                }
                rng.fill(pair.deviceArea(), count: 4)
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
                if driver.isBroken {
                    // Broken by the event suppression snapshot in publish().
                    if driver.failAll().sorted() != model.values.map(\.token).sorted() { bad += 1 }
                    violations += 1
                    driver.reset()
                    model = [:]
                }
                if driver.inFlightCount != model.count { bad += 1 }
                if driver.freeCount != size - model.values.reduce(0, { $0 + $1.slots }) { bad += 1 }
                _ = driver.enableInterrupts()
            }
            #expect(bad == 0)
        }
        #expect(completions > 1000 && violations > 500, "\(completions) \(violations)")
    }
}
