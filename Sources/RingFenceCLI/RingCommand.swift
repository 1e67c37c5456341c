import ArgumentParser
import RingTestSupport
import Virtqueue

#if canImport(Glibc)
import Glibc
#endif

/// Options shared by the commands that run the two-process ring.
struct RingOptions: ParsableArguments {
    @Option(help: "Seconds to run.")
    var seconds: Double = 3

    @Option(help: "Requests kept in flight (at most half the queue).")
    var depth: Int = 32

    @Option(help: "Payload bytes per request.")
    var payload: Int = 64

    @Option(name: .customLong("queue-size"), help: "Descriptors in the ring (power of two, 2...32768).")
    var queueSize: Int = 256

    @Flag(name: .customLong("no-event-idx"), help: "Do not use VIRTIO_F_EVENT_IDX notification suppression.")
    var noEventIndex = false

    func validate() throws {
        guard SplitLayout.isValidQueueSize(queueSize), queueSize >= 2 else {
            throw ValidationError("--queue-size must be a power of two in 2...32768")
        }
        guard depth >= 1 else { throw ValidationError("--depth must be at least 1") }
        guard payload >= 1, payload <= 1 << 20 else { throw ValidationError("--payload must be in 1...1048576") }
        guard seconds > 0, seconds <= 3600 else { throw ValidationError("--seconds must be in (0, 3600]") }
    }
}

/// Runs the hardened driver against an echo device in a child process and reports.
func runTwoProcessRing(_ o: RingOptions, label: String) throws -> RingRunReport {
    let ring = try TwoProcessRing(
        queueSize: o.queueSize, features: RingFeatures(eventIndex: !o.noEventIndex, indirectDescriptors: false),
        bounceBytes: max(4 << 20, o.depth * (2 * o.payload + 256)))
    defer { _ = ring.finish() }
    print("\(label): driver pid \(getpid()), device pid \(ring.childPID); sealed memfd + kick/call eventfds")
    let report = try ring.run(seconds: o.seconds, depth: o.depth, payloadSize: o.payload) { r in
        print("  \(format(r.seconds, 1)) s  \(format(r.roundTripsPerSecond, 0)) round trips/s")
    }
    print(
        "\(label): \(report.roundTrips) round trips in \(format(report.seconds, 2)) s = "
            + "\(format(report.roundTripsPerSecond, 0))/s (\(format(report.mebibytesPerSecond, 1)) MiB/s payload), "
            + "\(report.kicks) kicks, \(report.interrupts) interrupts, \(report.checksumFailures) checksum failures")
    return report
}

struct RingCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ring",
        abstract: "Round-trip payloads through a hardened split virtqueue to a device in another process.",
        discussion: """
            Spawns a child process as the device, shares one sealed memfd and two eventfds with \
            it over a Unix socket, and moves checksummed payloads through the ring for the \
            given time. Exit status 1 if any payload came back wrong or the device misbehaved.
            """)

    @OptionGroup var options: RingOptions

    func run() throws {
        let report = try runTwoProcessRing(options, label: "ring")
        if report.checksumFailures > 0 { throw ExitCode(1) }
    }
}

struct RingDeviceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ring-device",
        abstract: "The device half of `ringfence ring` (started by it; not for direct use).",
        shouldDisplay: false)

    @Option(help: "Inherited Unix socket descriptor.")
    var fd: Int32

    func run() throws {
        _ = try TwoProcessRing.serveDevice(channelFD: fd)
    }
}
