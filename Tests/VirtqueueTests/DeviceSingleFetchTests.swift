import RingTestSupport
import SharedMemory
import Testing
import Virtqueue

extension SpinningRaces {
    /// R2 on the device: each descriptor field is loaded once, validated, then used. A driver
    /// thread flipping a descriptor between a valid and an invalid form while the device walks
    /// it must yield either the valid chain or the rejection, never a chain whose buffer lies
    /// outside the shared memory.
    @Suite struct DeviceSingleFetchTests {
        /// Races the device against a flipper on descriptor 0 (queue size 1) for a bounded time.
        static func race(
            flippingDescriptorByte offset: Int, good: UInt32, bad: UInt32,
            isExpectedRejection: (Violation) -> Bool
        ) throws -> (ready: Int, rejected: Int, wrong: Int) {
            let pair = try RingPair(queueSize: 1, bounceBytesPerQueue: 4096)
            let a = RingAttacker(pair)
            let device = pair.device
            a.writeDescriptor(0, address: a.scratchGuest, length: 16, flags: SplitLayout.flagWrite)
            let lo = UInt(bitPattern: pair.region.base)
            let hi = lo + UInt(pair.region.size)
            let flipper = WordFlipper(a.descriptors + offset, good, bad)
            flipper.start()
            defer { flipper.stop() }
            var chain = DescriptorChain()
            var ready = 0
            var rejected = 0
            var wrong = 0
            let deadline = Deadline.after(seconds: 2)
            var i = 0
            while i < 200_000 && !(ready >= 500 && rejected >= 500) && !deadline.hasPassed {
                i += 1
                a.offer(0)
                do {
                    switch try device.nextChain(into: &chain, memory: pair.memory) {
                    case .ready:
                        let ok =
                            chain.segments.count == 1
                            && chain.segments.allSatisfy { s in
                                let base = UInt(bitPattern: s.buffer.baseAddress)
                                return base >= lo && base + UInt(s.buffer.count) <= hi && s.buffer.count == 16
                                    && base == lo + UInt(a.scratchOffset)
                            }
                        if ok { ready += 1 } else { wrong += 1 }
                    case .rejected(let head, let v):
                        if head == 0 && isExpectedRejection(v) { rejected += 1 } else { wrong += 1 }
                    case .empty:
                        wrong += 1
                    }
                } catch {
                    wrong += 1
                }
                device.complete(head: 0, length: 0)
            }
            return (ready, rejected, wrong)
        }

        @Test func descriptorLengthFlippedDuringWalkNeverEscapesTheRegion() throws {
            let pair = try RingPair(queueSize: 1, bounceBytesPerQueue: 4096)
            let scratch = RingAttacker(pair).scratchGuest
            let r = try Self.race(
                flippingDescriptorByte: SplitLayout.descLen, good: 16, bad: 0xFFFF_FFF0,
                isExpectedRejection: {
                    $0 == .descriptorAddressInvalid(head: 0, .unmapped(address: scratch, length: 0xFFFF_FFF0))
                })
            #expect(r.wrong == 0)
            #expect(r.ready > 0)
            #expect(r.rejected > 0)
        }

        @Test func descriptorAddressFlippedDuringWalkNeverEscapesTheRegion() throws {
            // The high half of addr: 0 (inside the region) or 1 (4 GiB higher, unmapped).
            let pair = try RingPair(queueSize: 1, bounceBytesPerQueue: 4096)
            let scratch = RingAttacker(pair).scratchGuest
            let r = try Self.race(
                flippingDescriptorByte: SplitLayout.descAddr + 4, good: 0, bad: 1,
                isExpectedRejection: {
                    $0 == .descriptorAddressInvalid(head: 0, .unmapped(address: scratch + (1 << 32), length: 16))
                })
            #expect(r.wrong == 0)
            #expect(r.ready > 0)
            #expect(r.rejected > 0)
        }
    }
}
