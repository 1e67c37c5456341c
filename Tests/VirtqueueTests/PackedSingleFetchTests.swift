import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

extension SpinningRaces {
    /// R2 on the packed ring, both sides: the peer flips a length between a valid and an
    /// invalid value while the other side reads the descriptor. Every outcome must be the
    /// valid value or the exact violation, never anything built from a second fetch.
    @Suite struct PackedSingleFetchTests {
        static let iterations = 20_000

        @Test func driverSeesFlippedUsedLengthOnceOnly() throws {
            let pair = try PackedRingPair(queueSize: 1, bounceBytesPerQueue: 4096)
            let driver = pair.driver
            let back = try #require(pair.pool.allocate(64))
            let segment = pair.pool.segment(back, deviceWritable: true)
            let flipper = WordFlipper(pair.descriptor(0) + PackedLayout.descLen, 8, 1000)
            flipper.start()
            defer { flipper.stop() }
            var valid = 0
            var violations = 0
            var wrong = 0
            for i in 0..<Self.iterations {
                try driver.add([segment], token: UInt64(i))
                _ = driver.publish()
                // The device marks slot 0 used (id 0) with the current lap's wrap counter.
                let wrap = driver.lastUsed.wrap
                SharedAccess.store16(pair.descriptor(0) + PackedLayout.descID, 0)
                SharedAccess.store16Release(
                    pair.descriptor(0) + PackedLayout.descFlags, PackedLayout.usedMarker(wrap: wrap))
                do throws(Violation) {
                    guard let c = try driver.nextCompletion() else {
                        wrong += 1
                        continue
                    }
                    // 8 from the device, or 64 if the driver's own write of the slot won the
                    // race with the flipper: both are single values <= the 64 bytes posted.
                    if (c.length == 8 || c.length == 64) && c.token == UInt64(i) { valid += 1 } else { wrong += 1 }
                } catch {
                    if error == .usedLengthTooLarge(id: 0, length: 1000, writable: 64) {
                        violations += 1
                    } else {
                        wrong += 1
                    }
                    _ = driver.failAll()
                    driver.reset()
                }
            }
            #expect(wrong == 0)
            #expect(valid + violations == Self.iterations)
        }

        @Test func deviceSeesFlippedDescriptorLengthOnceOnly() throws {
            let pair = try PackedRingPair(queueSize: 1, bounceBytesPerQueue: 4096)
            let device = pair.device
            let flipper = WordFlipper(pair.descriptor(0) + PackedLayout.descLen, 16, 0xFFFF_FFF0)
            SharedAccess.store32(pair.descriptor(0) + PackedLayout.descLen, 16)  // before the thread runs
            flipper.start()
            defer { flipper.stop() }
            var chain = DescriptorChain()
            var ready = 0
            var rejected = 0
            var wrong = 0
            let address = pair.pool.guestAddress
            for i in 0..<Self.iterations {
                let d = pair.descriptor(0)
                SharedAccess.store64(d + PackedLayout.descAddr, address)
                SharedAccess.store16(d + PackedLayout.descID, 0)
                SharedAccess.store16Release(
                    d + PackedLayout.descFlags,
                    PackedLayout.availableMarker(wrap: i % 2 == 0) | PackedLayout.flagWrite)
                do throws(Violation) {
                    switch try device.nextChain(into: &chain, memory: pair.memory) {
                    case .ready:
                        if chain.writableLength == 16 && chain.segments.count == 1
                            && chain.segments[0].buffer.count == 16
                        {
                            ready += 1
                        } else {
                            wrong += 1
                        }
                        device.complete(head: chain.head, length: 16)
                    case .rejected(let id, let v):
                        if id == 0, case .descriptorAddressInvalid = v { rejected += 1 } else { wrong += 1 }
                        device.complete(head: id, length: 16)  // the used len lands where the flipper writes
                    case .empty:
                        wrong += 1
                    }
                } catch {
                    wrong += 1
                    break
                }
                _ = device.publishUsed()
            }
            #expect(wrong == 0)
            #expect(ready + rejected == Self.iterations)
        }
    }
}
