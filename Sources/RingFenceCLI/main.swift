import ArgumentParser

struct RingFence: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ringfence",
        abstract: "Hardened virtio and Xen-style rings for devices you do not trust.",
        subcommands: [ServeBlkCommand.self])
}

// Top-level entry (a module with several files cannot use @main in main.swift).
RingFence.main()
