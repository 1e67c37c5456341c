import ArgumentParser

struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Show RingFence working on an embedded default device, no set-up needed.",
        discussion: "Runs a hardened split virtqueue between this process and a device process.")

    @Option(help: "Seconds to run the ring.")
    var seconds: Double = 3

    func run() throws {
        var o = try RingOptions.parse([])
        o.seconds = seconds
        let report = try runTwoProcessRing(o, label: "demo")
        if report.checksumFailures > 0 { throw ExitCode(1) }
        print("demo: every payload came back intact through the hardened ring")
    }
}
