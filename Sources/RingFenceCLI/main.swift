import ArgumentParser

@main
struct RingFence: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ringfence",
        abstract: "Hardened virtio and Xen-style rings for devices you do not trust.",
        subcommands: [ServeBlkCommand.self])
}
