import ArgumentParser

struct RingFence: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ringfence",
        abstract: "Hardened virtio and Xen-style rings for devices you do not trust.",
        discussion: """
            Drivers that validate everything their device writes, devices that validate
            everything their driver writes, and an adversary to audit both.
            """,
        subcommands: [
            DemoCommand.self,
            Blk.self,
            ServeBlkCommand.self,
            Fs.self,
            ServeFsCommand.self,
            RingCommand.self,
            RingDeviceCommand.self,
            ServeXenBlkCommand.self,
            XenBlkCommand.self,
            ServeXenNetCommand.self,
            XenNet.self,
            AuditCommand.self,
            AuditOneCommand.self,
            SealCommand.self,
            AuditOneFSCommand.self,
        ])
}

// Top-level entry (a module with several files cannot use @main in main.swift).
RingFence.main()
