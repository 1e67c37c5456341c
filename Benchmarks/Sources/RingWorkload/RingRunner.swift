import CBenchSupport
import Foundation
import RingTestSupport
import SharedMemory
import Synchronization
import TrustingRing
import Virtqueue

/// Which driver drives the ring. The device is the library's hardened `DeviceQueue`
/// (split) or `PackedDeviceQueue` (packed) in every case.
public enum DriverKind: String, CaseIterable, Sendable {
    case hardened
    case trusting
    case packedHardened = "packed hardened"
    case packedTrusting = "packed trusting"
}

/// What one measurement does.
public enum Scenario: String, CaseIterable, Sendable {
    /// Driver and device in one thread: post a batch, the device serves it, the driver
    /// reaps it. Per-request cost of both sides without any cache-line transfer.
    case oneThreadBatch = "1-thread batch"
    /// Driver thread and device thread, pinned to CPUs 0 and 1, busy-polling; the driver
    /// keeps up to queueSize/2 two-descriptor requests in flight, posted in batches.
    case twoThreadBatch = "2-thread batch"
    /// One request in flight, device in the same thread: post, serve, reap.
    case oneThreadLatency = "1-thread latency"
    /// One request in flight between the two pinned threads: post, spin until reaped.
    case twoThreadLatency = "2-thread latency"
    /// What Linux's tools/virtio/ringtest `virtio_ring_0_9` does by default (issue 19):
    /// guest and host thread busy-polling, one-descriptor buffers with no payload copies,
    /// the whole ring in flight, the avail index published after every buffer and the used
    /// index after every completion (batch 1). Build the runner with `batch = 1`.
    case ringtest = "ringtest 0.9"

    public var needsDeviceThread: Bool {
        self == .twoThreadBatch || self == .twoThreadLatency || self == .ringtest
    }
}

/// A driver plus the hardened device on one `RingPair`, with everything preallocated:
/// 64-byte request and response bounce slices per slot, and the two segments of each.
public protocol RingRunner: AnyObject {
    var kind: DriverKind { get }
    /// Runs `operations` round trips of `scenario` and returns the elapsed time
    /// (setup such as starting the device thread is not timed).
    func run(_ scenario: Scenario, operations: Int) -> Timing
    /// For harnesses that time themselves (ordo-one/benchmark): start / stop the device
    /// thread, and run operations untimed.
    func startDeviceThread()
    func stopDeviceThread()
    func perform(_ scenario: Scenario, operations: Int)
    /// Chains the device has served (sanity check).
    var served: Int { get }
}

/// Elapsed nanoseconds of one run.
public struct Timing: Sendable {
    /// Wall clock.
    public var wall: Double
    /// CPU time of the driver thread (CLOCK_THREAD_CPUTIME_ID): excludes time the thread
    /// was descheduled, so 1-thread figures stay meaningful on a machine shared with
    /// other work. Meaningless for the 2-thread scenarios' throughput (use `wall`).
    public var threadCPU: Double
}

/// Nanoseconds of CPU time the calling thread has used.
@inline(__always)
func threadCPUNanoseconds() -> UInt64 {
    var t = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
    return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
}

public struct RingParameters: Sendable {
    public var queueSize = 256
    public var batch = 32
    public var payloadBytes = 64
    public var driverCPU: Int32 = 0
    public var deviceCPU: Int32 = 1
    public init() {}
}

public func makeRunner(_ kind: DriverKind, parameters: RingParameters = RingParameters()) throws -> any RingRunner {
    switch kind {
    case .hardened:
        let pair = try RingPair(queueSize: parameters.queueSize)
        return HardenedRunner(
            RingBench(
                kind: kind, pair: pair, pool: pair.pool, memory: pair.memory, device: pair.device,
                driver: HardenedDriver(queue: pair.driver), parameters: parameters))
    case .trusting:
        // Same ring memory as the hardened driver would use; that driver stays idle.
        let pair = try RingPair(queueSize: parameters.queueSize)
        let trusting = TrustingDriverQueue(memory: pair.driver.memory)
        return TrustingRunner(
            RingBench(
                kind: kind, pair: pair, pool: pair.pool, memory: pair.memory, device: pair.device,
                driver: TrustingDriver(queue: trusting), parameters: parameters))
    case .packedHardened:
        let pair = try PackedRingPair(queueSize: parameters.queueSize)
        return PackedHardenedRunner(
            RingBench(
                kind: kind, pair: pair, pool: pair.pool, memory: pair.memory, device: pair.device,
                driver: PackedHardenedDriver(queue: pair.driver), parameters: parameters))
    case .packedTrusting:
        let pair = try PackedRingPair(queueSize: parameters.queueSize)
        let trusting = TrustingPackedDriverQueue(memory: pair.driver.memory)
        return PackedTrustingRunner(
            RingBench(
                kind: kind, pair: pair, pool: pair.pool, memory: pair.memory, device: pair.device,
                driver: PackedTrustingDriver(queue: trusting), parameters: parameters))
    }
}

// One concrete runner per driver, so the generic workload is specialized for each
// (called through the protocol directly, RingBench<D> would run unspecialized and reach
// the driver through witness tables on every request).

final class HardenedRunner: RingRunner {
    let bench: RingBench<HardenedDriver, DeviceQueue>
    init(_ bench: RingBench<HardenedDriver, DeviceQueue>) { self.bench = bench }
    var kind: DriverKind { bench.kind }
    var served: Int { bench.served }
    func run(_ scenario: Scenario, operations: Int) -> Timing { bench.run(scenario, operations: operations) }
    func perform(_ scenario: Scenario, operations: Int) { bench.perform(scenario, operations: operations) }
    func startDeviceThread() { bench.startDeviceThread() }
    func stopDeviceThread() { bench.stopDeviceThread() }
}

final class TrustingRunner: RingRunner {
    let bench: RingBench<TrustingDriver, DeviceQueue>
    init(_ bench: RingBench<TrustingDriver, DeviceQueue>) { self.bench = bench }
    var kind: DriverKind { bench.kind }
    var served: Int { bench.served }
    func run(_ scenario: Scenario, operations: Int) -> Timing { bench.run(scenario, operations: operations) }
    func perform(_ scenario: Scenario, operations: Int) { bench.perform(scenario, operations: operations) }
    func startDeviceThread() { bench.startDeviceThread() }
    func stopDeviceThread() { bench.stopDeviceThread() }
}

final class PackedHardenedRunner: RingRunner {
    let bench: RingBench<PackedHardenedDriver, PackedDeviceQueue>
    init(_ bench: RingBench<PackedHardenedDriver, PackedDeviceQueue>) { self.bench = bench }
    var kind: DriverKind { bench.kind }
    var served: Int { bench.served }
    func run(_ scenario: Scenario, operations: Int) -> Timing { bench.run(scenario, operations: operations) }
    func perform(_ scenario: Scenario, operations: Int) { bench.perform(scenario, operations: operations) }
    func startDeviceThread() { bench.startDeviceThread() }
    func stopDeviceThread() { bench.stopDeviceThread() }
}

final class PackedTrustingRunner: RingRunner {
    let bench: RingBench<PackedTrustingDriver, PackedDeviceQueue>
    init(_ bench: RingBench<PackedTrustingDriver, PackedDeviceQueue>) { self.bench = bench }
    var kind: DriverKind { bench.kind }
    var served: Int { bench.served }
    func run(_ scenario: Scenario, operations: Int) -> Timing { bench.run(scenario, operations: operations) }
    func perform(_ scenario: Scenario, operations: Int) { bench.perform(scenario, operations: operations) }
    func startDeviceThread() { bench.startDeviceThread() }
    func stopDeviceThread() { bench.stopDeviceThread() }
}

/// CPUs this process may use.
public var availableCPUs: Int { Int(rfb_cpu_count()) }

/// Pins the calling thread (0 or an errno value).
@discardableResult
public func pinCurrentThread(to cpu: Int32) -> Int32 { rfb_pin_thread(cpu) }

/// The device's side, in an object of its own so the driver thread's hot fields never
/// share a cache line with it.
/// States of the device thread.
enum DeviceThreadState {
    static let idle = 0, running = 1, stopping = 2
}

final class DeviceSide<Q: DeviceRing & SendableMetatype>: @unchecked Sendable {
    var device: CopyDevice<Q>
    let state = Atomic<Int>(0)
    let batch: Int
    let cpu: Int32

    init(device: CopyDevice<Q>, batch: Int, cpu: Int32) {
        self.device = device
        self.batch = batch
        self.cpu = cpu
    }

    /// The device thread: busy-poll, serve up to a batch, publish once per batch.
    func loop() {
        _ = rfb_pin_thread(cpu)
        state.store(DeviceThreadState.running, ordering: .releasing)
        while state.load(ordering: .acquiring) == DeviceThreadState.running {
            if device.serve(budget: batch) > 0 {
                _ = device.queue.publishUsed()
            } else {
                rfb_cpu_relax()
            }
        }
        state.store(DeviceThreadState.idle, ordering: .releasing)
    }
}

final class RingBench<D: BenchDriver, Q: DeviceRing & SendableMetatype> {
    let kind: DriverKind
    /// Keeps the shared region alive (a `RingPair` or `PackedRingPair`).
    let pair: AnyObject
    let driver: D
    let pool: BouncePool
    let deviceSide: DeviceSide<Q>
    let parameters: RingParameters
    let batch: Int
    let slotCount: Int
    /// Two segments (request readable, response writable) per slot.
    let segments: UnsafeMutablePointer<Segment>
    let requests: UnsafeMutablePointer<BounceSlice>
    let responses: UnsafeMutablePointer<BounceSlice>
    let freeSlots: UnsafeMutablePointer<Int>
    var freeSlotCount: Int
    /// `ringtest`: one device-writable 64-byte buffer per descriptor (never copied).
    let singles: UnsafeMutablePointer<Segment>
    let payload: UnsafeMutableRawBufferPointer
    let reply: UnsafeMutableRawBufferPointer
    /// Folds a byte of every reply, so the copies cannot be optimized away.
    var sink: UInt64 = 0
    var deviceThreadRunning = false

    init(
        kind: DriverKind, pair: AnyObject, pool: BouncePool, memory: GuestMemory, device: Q, driver: D,
        parameters: RingParameters
    ) {
        self.kind = kind
        self.pair = pair
        self.driver = driver
        self.pool = pool
        self.parameters = parameters
        self.batch = parameters.batch
        self.deviceSide = DeviceSide(
            device: CopyDevice(queue: device, memory: memory), batch: parameters.batch,
            cpu: parameters.deviceCPU)
        slotCount = parameters.queueSize / 2
        segments = .allocate(capacity: 2 * slotCount)
        requests = .allocate(capacity: slotCount)
        responses = .allocate(capacity: slotCount)
        freeSlots = .allocate(capacity: slotCount)
        payload = .allocate(byteCount: parameters.payloadBytes, alignment: 64)
        reply = .allocate(byteCount: parameters.payloadBytes, alignment: 64)
        for i in 0..<parameters.payloadBytes { payload[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 1) }
        reply.initializeMemory(as: UInt8.self, repeating: 0)
        for slot in 0..<slotCount {
            guard let request = pool.allocate(parameters.payloadBytes),
                let response = pool.allocate(parameters.payloadBytes)
            else { fatalError("bounce pool too small") }
            (requests + slot).initialize(to: request)
            (responses + slot).initialize(to: response)
            (segments + 2 * slot).initialize(to: pool.segment(request, deviceWritable: false))
            (segments + 2 * slot + 1).initialize(to: pool.segment(response, deviceWritable: true))
            freeSlots[slot] = slotCount - 1 - slot
        }
        freeSlotCount = slotCount
        singles = .allocate(capacity: parameters.queueSize)
        for i in 0..<parameters.queueSize {
            guard let buffer = pool.allocate(64) else { fatalError("bounce pool too small") }
            (singles + i).initialize(to: pool.segment(buffer, deviceWritable: true))
        }
    }

    deinit {
        stopDeviceThread()
        segments.deallocate()
        requests.deallocate()
        responses.deallocate()
        freeSlots.deallocate()
        singles.deallocate()
        payload.deallocate()
        reply.deallocate()
    }

    var served: Int { deviceThreadRunning ? -1 : deviceSide.device.served }

    // MARK: driver side

    /// Copies the payload in and posts `count` requests, then publishes once.
    @inline(__always)
    func postBatch(_ count: Int) {
        for _ in 0..<count {
            freeSlotCount -= 1
            let slot = freeSlots[freeSlotCount]
            pool.copyIn(requests[slot], from: UnsafeRawBufferPointer(payload))
            guard driver.post(UnsafeBufferPointer(start: segments + 2 * slot, count: 2), token: UInt64(slot))
            else { fatalError("\(kind): ring full with a free slot") }
        }
        driver.publish()
    }

    /// Reaps every completion available now, copying out the validated length.
    @inline(__always)
    func drain() -> Int {
        var n = 0
        while let c = driver.poll() {
            let slot = Int(c.token)
            pool.copyOut(responses[slot], validatedLength: Int(c.length), to: reply)
            sink &+= UInt64(reply[0])
            freeSlots[freeSlotCount] = slot
            freeSlotCount += 1
            n += 1
        }
        return n
    }

    // MARK: scenarios

    func oneThreadBatch(_ total: Int) {
        var done = 0
        while done < total {
            let k = min(batch, total - done)
            postBatch(k)
            _ = deviceSide.device.serve(budget: k)
            _ = deviceSide.device.queue.publishUsed()
            let got = drain()
            guard got == k else { fatalError("\(kind): reaped \(got) of \(k)") }
            done += k
        }
    }

    func oneThreadLatency(_ total: Int) {
        for _ in 0..<total {
            postBatch(1)
            _ = deviceSide.device.serve(budget: 1)
            _ = deviceSide.device.queue.publishUsed()
            guard drain() == 1 else { fatalError("\(kind): no completion") }
        }
    }

    func twoThreadBatch(_ total: Int) {
        var posted = 0
        var completed = 0
        while completed < total {
            var progressed = false
            while posted < total {
                let k = min(batch, total - posted)
                guard freeSlotCount >= k else { break }
                postBatch(k)
                posted += k
                progressed = true
            }
            let got = drain()
            completed += got
            if got == 0 && !progressed { rfb_cpu_relax() }
        }
    }

    func twoThreadLatency(_ total: Int) {
        for _ in 0..<total {
            postBatch(1)
            while drain() == 0 {}
        }
    }

    /// tools/virtio/ringtest main.c `run_guest` without `--sleep`: add while the ring has
    /// room, reap whatever completed, repeat until neither made progress, then poll.
    func ringtest(_ total: Int) {
        var started = 0
        var completed = 0
        let ring = parameters.queueSize
        while completed < total {
            var progressed = true
            while progressed {
                progressed = false
                if started < total && started - completed < ring {
                    let i = started & (ring - 1)
                    guard driver.post(UnsafeBufferPointer(start: singles + i, count: 1), token: UInt64(i))
                    else { fatalError("\(kind): ring full with \(started - completed) in flight") }
                    driver.publish()
                    started += 1
                    progressed = true
                }
                if driver.poll() != nil {
                    completed += 1
                    progressed = true
                }
            }
        }
    }

    func perform(_ scenario: Scenario, operations: Int) {
        switch scenario {
        case .ringtest: ringtest(operations)
        case .oneThreadBatch: oneThreadBatch(operations)
        case .oneThreadLatency: oneThreadLatency(operations)
        case .twoThreadBatch: twoThreadBatch(operations)
        case .twoThreadLatency: twoThreadLatency(operations)
        }
    }

    func run(_ scenario: Scenario, operations: Int) -> Timing {
        _ = rfb_pin_thread(parameters.driverCPU)
        let threaded = scenario.needsDeviceThread
        if threaded { startDeviceThread() }
        let cpuStart = threadCPUNanoseconds()
        let start = DispatchTime.now().uptimeNanoseconds
        perform(scenario, operations: operations)
        let end = DispatchTime.now().uptimeNanoseconds
        let cpuEnd = threadCPUNanoseconds()
        if threaded { stopDeviceThread() }
        return Timing(wall: Double(end - start), threadCPU: Double(cpuEnd - cpuStart))
    }

    // MARK: device thread

    func startDeviceThread() {
        guard !deviceThreadRunning else { return }
        let side = deviceSide
        let thread = Thread { side.loop() }
        thread.stackSize = 1 << 20
        thread.start()
        while side.state.load(ordering: .acquiring) != DeviceThreadState.running { sched_yield() }
        deviceThreadRunning = true
    }

    func stopDeviceThread() {
        guard deviceThreadRunning else { return }
        deviceSide.state.store(DeviceThreadState.stopping, ordering: .releasing)
        while deviceSide.state.load(ordering: .acquiring) != DeviceThreadState.idle { sched_yield() }
        deviceThreadRunning = false
    }
}
