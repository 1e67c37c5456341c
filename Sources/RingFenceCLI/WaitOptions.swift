import ArgumentParser
import SharedMemory

/// `--poll` / `--spin-us N`: how a driver or a device waits for its peer (issue 19), the
/// same two options on every command that drives or serves a ring.
struct WaitOptions: ParsableArguments {
    @Flag(help: "Busy-poll the ring, never block: lowest latency, one CPU busy per queue.")
    var poll = false

    @Option(
        name: .customLong("spin-us"),
        help: ArgumentHelp(
            "Poll this many microseconds after the last work, then block (0: interrupts only). "
                + "Default: adaptive by time (spins 4-100 us, idle costs next to no CPU).",
            valueName: "n"))
    var spinMicroseconds: UInt64?

    func validate() throws {
        if poll && spinMicroseconds != nil { throw ValidationError("give --poll or --spin-us, not both") }
        if let spinMicroseconds, spinMicroseconds > 1_000_000 {
            throw ValidationError("--spin-us must be 0...1000000")
        }
    }

    var strategy: WaitStrategy {
        if poll { return .poll }
        if let spinMicroseconds { return .spin(nanoseconds: spinMicroseconds * 1000) }
        return .adaptive
    }
}
