import Adversary
import BlockImage
import Foundation
import SharedMemory
import Testing
import VhostUser
import VirtioBlock
import Virtqueue

/// The packed-ring attacks of the catalogue (issue 7) against our driver, through the real
/// back-end, `PackedDeviceQueue` and blk device: the packed ring is negotiated (asserted),
/// each attack ends with its exact value, sticky, within the deadline, and the healthy
/// device of the same process is unaffected.
@Suite("packed-ring attacks, exact", .serialized)
struct PackedAttackTests {
    static let packedNames = [
        "packed-used-wrong-wrap", "packed-used-id-out-of-range", "packed-used-id-not-in-flight",
        "packed-duplicate-id", "packed-used-len-overflow", "packed-used-slot-not-available",
        "packed-event-flags-3", "packed-event-offset-beyond-ring", "packed-toctou-used-descriptor",
    ]

    /// An attacked device with our driver connected over the packed ring.
    func connect(_ name: String, timeout: Double = 2) throws -> (AttackBed, VirtioBlockDriver) {
        let bed = try AttackBed(name)
        let disk = try bed.connect(timeout: timeout)
        #expect(disk.ringFormat == .packed, "our driver acks the packed ring the adversary offers")
        #expect(bed.server.device.observations.negotiatedRing == .packed)
        #expect(bed.server.device.isApplicable)
        return (bed, disk)
    }

    func read(_ disk: VirtioBlockDriver) -> (VirtioError?, Double) {
        measure { () throws(VirtioError) in _ = try disk.read(at: 0, count: 4096) }
    }

    /// R6: `v` failed the request, within the deadline; the device stays broken with it;
    /// the second device of the process still works.
    func expectContained(
        _ bed: AttackBed, _ disk: VirtioBlockDriver, _ outcome: (VirtioError?, Double), _ v: Violation,
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        #expect(outcome.0 == .violation(v), sourceLocation: sourceLocation)
        #expect(outcome.1 < 2, "detected within the request deadline", sourceLocation: sourceLocation)
        #expect(disk.isBroken && disk.failure == .violation(v), sourceLocation: sourceLocation)
        #expect(read(disk).0 == .violation(v), "sticky", sourceLocation: sourceLocation)
        try bed.neighbourStillWorks()
    }

    @Test func usedFlagsWithTheOtherLapsWrapCounterBreakTheDevice() throws {
        let (bed, disk) = try connect("packed-used-wrong-wrap")
        defer { disk.close() }
        // AVAIL = USED = 0 in lap 1 (wrap counter 1), WRITE for the 4097 bytes.
        try expectContained(
            bed, disk, read(disk), .packedUsedWrapCounter(slot: 0, flags: PackedLayout.flagWrite, wrap: true))
    }

    @Test func usedIdOutOfRangeBreaksTheDevice() throws {
        let (bed, disk) = try connect("packed-used-id-out-of-range")
        defer { disk.close() }
        try expectContained(bed, disk, read(disk), .usedIdOutOfRange(id: 135, queueSize: 128))
    }

    @Test func usedIdNeverPostedBreaksTheDevice() throws {
        let (bed, disk) = try connect("packed-used-id-not-in-flight")
        defer { disk.close() }
        try expectContained(bed, disk, read(disk), .usedIdNotInFlight(id: 127))
    }

    @Test func usedLengthBeyondPostedBreaksTheDevice() throws {
        let (bed, disk) = try connect("packed-used-len-overflow")
        defer { disk.close() }
        try expectContained(bed, disk, read(disk), .usedLengthTooLarge(id: 0, length: 4097 + 4096, writable: 4097))
    }

    /// Two reads in flight (ids 0 and 1, slots 0-2 and 3-5): id 0 completes, then id 0
    /// again in slot 3, where id 1's completion belongs.
    @Test func duplicatedIdIsRefusedWhileAnotherRequestIsInFlight() throws {
        let (bed, disk) = try connect("packed-duplicate-id")
        defer { disk.close() }
        let q = disk.queue(0)
        let a = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer {
            a.deallocate()
            b.deallocate()
        }
        try q.submitRead(offset: 0, into: a, tag: 1)
        try q.submitRead(offset: 4096, into: b, tag: 2)
        let start = monotonicNanoseconds()
        let first = try #require(q.wait())
        #expect(first.tag == 1 && first.result == .success(4096))
        let second = try #require(q.wait())
        let seconds = Double(monotonicNanoseconds() &- start) / 1e9
        let v = Violation.usedIdNotInFlight(id: 0)
        #expect(second.tag == 2 && second.result == .failure(.violation(v)))
        try expectContained(bed, disk, (.violation(v), seconds), v)
    }

    /// The device writes a used mark into slot 3 after completing the read in slots 0-2:
    /// the driver, polling with nothing in flight (as on an interrupt), refuses it.
    @Test func usedMarkInASlotNeverMadeAvailableBreaksTheDevice() throws {
        let (bed, disk) = try connect("packed-used-slot-not-available")
        defer { disk.close() }
        #expect(read(disk).0 == nil, "the request itself was completed correctly")
        #expect(!disk.isBroken)
        let start = monotonicNanoseconds()
        #expect(disk.queue(0).poll() == nil)
        let seconds = Double(monotonicNanoseconds() &- start) / 1e9
        let v = Violation.packedUsedSlotNotAvailable(slot: 3)
        try expectContained(bed, disk, (disk.failure, seconds), v)
        #expect(bed.server.device.observations.notes.contains { $0.contains("slot 3") })
    }

    @Test(arguments: [
        ("packed-event-flags-3", Violation.packedEventSuppressionInvalid(flags: 3, offWrap: 0, queueSize: 128)),
        (
            "packed-event-offset-beyond-ring",
            Violation.packedEventSuppressionInvalid(
                flags: PackedLayout.eventFlagDescriptor, offWrap: PackedLayout.eventWrapBit | 128, queueSize: 128)
        ),
    ])
    func eventSuppressionGarbageBreaksTheNextPublish(_ name: String, _ v: Violation) throws {
        let (bed, disk) = try connect(name)
        defer { disk.close() }
        #expect(read(disk).0 == nil, "the garbage is read at the driver's next publish")
        try expectContained(bed, disk, read(disk), v)
    }

    /// R2: each used descriptor is rewritten (id 0xdead, len 0xffffffff) once the driver
    /// has read it; the driver never looks again, so nothing changes.
    @Test func rewritingUsedDescriptorsAfterTheyWereReadChangesNothing() throws {
        let (bed, disk) = try connect("packed-toctou-used-descriptor")
        defer { disk.close() }
        for i in 0..<16 {
            let data = [UInt8](repeating: UInt8(i + 1), count: 1024)
            try disk.write(at: UInt64(i) * 1024, bytes: data)
            #expect(try disk.read(at: UInt64(i) * 1024, count: 1024) == data)
        }
        #expect(!disk.isBroken)
        // 32 requests: each one's used descriptor was rewritten when the next arrived.
        #expect(bed.server.device.observations.rewrittenDescriptors == 31)
        try bed.neighbourStillWorks()
    }

    // MARK: format awareness

    @Test func onlyPackedAttacksOfferThePackedRing() throws {
        let packed = Catalogue.all.filter { $0.ring == .packed }
        #expect(packed.map(\.name) == Self.packedNames)
        for a in Catalogue.all {
            #expect(a.name.hasPrefix("packed-") == (a.ring == .packed), "\(a.name)")
            #expect((a.group == .packedRing) == (a.ring == .packed), "\(a.name)")
        }
        let path = NSTemporaryDirectory() + "rf-offer-\(getpid()).img"
        defer { try? FileManager.default.removeItem(atPath: path) }
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: path))
        let inner = VirtioBlockDevice(image: try DeviceImage(path: path), options: VirtioBlockDeviceOptions())
        for a in Catalogue.all {
            let offered = AdversaryDevice(inner: inner, attack: a).features & FeatureBits.ringPacked != 0
            #expect(offered == (a.ring == .packed), "\(a.name)")
        }
    }

    /// A driver that does not ack the packed ring: the device serves it honestly, and the
    /// probe and the report say "not applicable", never a pass.
    @Test func packedAttackOnASplitDriverIsNotApplicable() throws {
        let bed = try AttackBed("packed-used-id-out-of-range")
        let disk = try bed.connect(packed: false)
        #expect(disk.ringFormat == .split)
        #expect(read(disk).0 == nil, "served honestly")
        disk.close()
        let device = bed.server.device
        #expect(device.observations.negotiatedRing == .split && !device.isApplicable)
        #expect(device.observations.notes.contains { $0.hasPrefix("not applicable") })

        let attack = try #require(Catalogue.attack(named: "packed-used-id-out-of-range"))
        var settings = DriverProbe.Settings()
        settings.packedRing = false
        let dir = NSTemporaryDirectory() + "rf-adv-na-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = DriverProbe.run(attack, settings: settings, directory: dir)
        #expect(r.signature == .notApplicable, "\(r.evidence)")
        #expect(r.evidence.hasPrefix("the driver acked the split ring, not VIRTIO_F_RING_PACKED"))
        let record = r.record(for: attack)
        #expect(record.outcome == .notApplicable && record.asExpected == nil)
        let split = try #require(Catalogue.attack(named: "used-id-out-of-range"))
        let passed = AuditRecord(attack: split, outcome: .contained, seconds: 0, evidence: "", asExpected: true)
        let md = AuditReport(target: "t", records: [passed, record], seconds: 1).markdown
        #expect(
            md.contains("| R3 | not applicable | ") && md.contains("| not applicable: the driver acked the split ring"))
        #expect(md.contains(" n/a |\n"))
        #expect(md.contains("Not applicable (skipped): packed-used-id-out-of-range."))
        #expect(md.contains("Every outcome is the one the catalogue expects.") && !md.contains("Unexpected"))
    }

    /// The exact values the audit's probe (two writes in flight, then an idle poll; the
    /// first write's chain is ids 0, slots 0-2, 1 writable byte) reports.
    @Test(arguments: [
        ("packed-used-wrong-wrap", Violation.packedUsedWrapCounter(slot: 0, flags: 2, wrap: true)),
        ("packed-used-id-out-of-range", .usedIdOutOfRange(id: 135, queueSize: 128)),
        ("packed-used-id-not-in-flight", .usedIdNotInFlight(id: 127)),
        ("packed-duplicate-id", .usedIdNotInFlight(id: 0)),
        ("packed-used-len-overflow", .usedLengthTooLarge(id: 0, length: 4097, writable: 1)),
        ("packed-used-slot-not-available", .packedUsedSlotNotAvailable(slot: 6)),
        ("packed-event-flags-3", .packedEventSuppressionInvalid(flags: 3, offWrap: 0, queueSize: 128)),
        ("packed-event-offset-beyond-ring", .packedEventSuppressionInvalid(flags: 2, offWrap: 0x8080, queueSize: 128)),
    ])
    func probeReportsTheExactViolation(_ name: String, _ v: Violation) throws {
        let attack = try #require(Catalogue.attack(named: name))
        let dir = NSTemporaryDirectory() + "rf-adv-p-\(getpid())-\(name)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = DriverProbe.run(attack, directory: dir)
        #expect(r.signature == .violation(Signature.name(of: v)), "\(r.evidence)")
        #expect(r.evidence.contains(v.description), "\(r.evidence)")
        #expect(r.neighbourOK && !r.canaryFound)
        #expect(r.record(for: attack).asExpected == true)
    }

    @Test func probeSeesRewrittenDescriptorsChangeNothing() throws {
        let attack = try #require(Catalogue.attack(named: "packed-toctou-used-descriptor"))
        let dir = NSTemporaryDirectory() + "rf-adv-p-\(getpid())-toctou"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = DriverProbe.run(attack, directory: dir)
        #expect(r.signature == .unaffected, "\(r.evidence)")
        #expect(
            r.evidence.contains("2 writes in flight") && r.evidence.contains("used descriptors after they were read"))
    }
}
