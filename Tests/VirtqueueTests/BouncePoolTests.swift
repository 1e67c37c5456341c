import PropertyBased
import SharedMemory
import RingTestSupport
import Testing
import Virtqueue

/// R7 on the bounce pool: live slices never overlap, freed memory is zeroed (no stale data
/// for the next request to expose), the padding after a slice stays zero, and copies are
/// clamped to the slice whatever length the device claimed.
@Suite struct BouncePoolTests {
    static func makePool(bytes: Int) throws -> (SharedRegion, BouncePool) {
        let region = try SharedRegion(name: "bounce", size: max(4096, bytes))
        return (region, BouncePool(base: region.base, guestAddress: 0x1000_0000, size: bytes))
    }

    @Test func allocationBounds() throws {
        let (region, pool) = try Self.makePool(bytes: 64 * 10 + 17)  // tail shorter than a granule
        #expect(pool.size == 640)
        #expect(pool.allocate(0) == nil)
        #expect(pool.allocate(-1) == nil)
        #expect(pool.allocate(641) == nil)
        let all = try #require(pool.allocate(640))
        #expect(all.offset == 0 && pool.bytesInUse == 640)
        #expect(pool.allocate(1) == nil)
        pool.free(all)
        #expect(pool.bytesInUse == 0)
        withExtendedLifetime(region) {}
    }

    @Test func freedMemoryIsZeroedAndPaddingStaysZero() throws {
        let (region, pool) = try Self.makePool(bytes: 4096)
        let s = try #require(pool.allocate(100))
        let secret = [UInt8](repeating: 0xEE, count: 200)
        secret.withUnsafeBytes { pool.copyIn(s, from: $0) }  // clamped to 100 bytes
        let bytes = UnsafeRawBufferPointer(start: pool.base + s.offset, count: 128)
        #expect(bytes[..<100].allSatisfy { $0 == 0xEE })
        #expect(bytes[100...].allSatisfy { $0 == 0 })  // padding of the last granule
        pool.free(s)
        #expect(bytes.allSatisfy { $0 == 0 })
        // The device scribbled past the length it was given: freeing still zeroes the granules.
        let t = try #require(pool.allocate(10))
        (pool.base + t.offset).initializeMemory(as: UInt8.self, repeating: 0x77, count: 64)
        pool.free(t)
        #expect(UnsafeRawBufferPointer(start: pool.base + t.offset, count: 64).allSatisfy { $0 == 0 })
        withExtendedLifetime(region) {}
    }

    @Test func copiesAreClampedToTheSlice() throws {
        let (region, pool) = try Self.makePool(bytes: 4096)
        let a = try #require(pool.allocate(10))
        let b = try #require(pool.allocate(64))
        (pool.base + b.offset).initializeMemory(as: UInt8.self, repeating: 0xBB, count: 64)
        var out = [UInt8](repeating: 0, count: 200)
        // A device-claimed length larger than the slice copies at most the slice.
        let n = out.withUnsafeMutableBytes { pool.copyOut(a, validatedLength: 0xFFFF_FFFF, to: $0) }
        #expect(n == 10)
        #expect(out.withUnsafeMutableBytes { pool.copyOut(a, at: 9, validatedLength: 5, to: $0) } == 1)
        #expect(out.withUnsafeMutableBytes { pool.copyOut(a, at: 10, validatedLength: 5, to: $0) } == 0)
        #expect(out.withUnsafeMutableBytes { pool.copyOut(a, at: -1, validatedLength: 5, to: $0) } == 0)
        #expect(out.withUnsafeMutableBytes { pool.copyOut(a, validatedLength: -5, to: $0) } == 0)
        #expect(!out.contains(0xBB))
        pool.store(UInt64.max, in: a, at: 3)  // would spill into the padding: refused
        pool.store(UInt32.max, in: a, at: -1)
        #expect(pool.loadByte(a, at: 10) == nil && pool.loadByte(a, at: -1) == nil)
        #expect(UnsafeRawBufferPointer(start: pool.base + a.offset, count: 64).allSatisfy { $0 == 0 })
        let seg = pool.segment(a, offset: 4, length: 100, deviceWritable: true)
        #expect(seg.length == 6 && seg.address == 0x1000_0000 + UInt64(a.offset) + 4)
        withExtendedLifetime(region) {}
    }

    @Test func randomAllocateFreeNeverOverlapsAndAccountsExactly() async throws {
        let (region, pool) = try Self.makePool(bytes: 64 * 200 + 5)
        await propertyCheck(count: 300, input: Gen.uint64()) { seed in
            var rng = SplitMix(seed: seed)
            var live: [BounceSlice] = []
            var bad = 0
            for _ in 0..<200 {
                if rng.next() % 3 != 0 || live.isEmpty {
                    let n = 1 + Int(rng.next() % (rng.next() % 4 == 0 ? 4000 : 200))
                    if let s = pool.allocate(n) {
                        // Inside the pool, and disjoint from every live slice (granule-wise).
                        let end = s.offset + ((n + 63) / 64) * 64
                        if s.offset < 0 || end > pool.size || s.offset % 64 != 0 || s.length != n { bad += 1 }
                        for o in live where s.offset < o.offset + ((o.length + 63) / 64) * 64 && o.offset < end {
                            bad += 1
                        }
                        // Fresh memory is zero.
                        if !UnsafeRawBufferPointer(start: pool.base + s.offset, count: end - s.offset).allSatisfy({
                            $0 == 0
                        }) {
                            bad += 1
                        }
                        (pool.base + s.offset).initializeMemory(as: UInt8.self, repeating: 0xA5, count: end - s.offset)
                        live.append(s)
                    }
                } else {
                    pool.free(live.remove(at: Int(rng.next() % UInt64(live.count))))
                }
                if pool.bytesInUse != live.reduce(0, { $0 + ($1.length + 63) / 64 * 64 }) { bad += 1 }
            }
            for s in live { pool.free(s) }
            #expect(bad == 0)
            #expect(pool.bytesInUse == 0)
            #expect(
                pool.allocate(pool.size).map {
                    pool.free($0)
                    return true
                } == true)  // no leaked granule
        }
        withExtendedLifetime(region) {}
    }
}
