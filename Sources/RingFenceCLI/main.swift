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
            Net.self,
            ServeNetCommand.self,
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

/// `ringfence blk read --help` asks for `read`'s help; the argument parser shows `blk`'s
/// when `blk`'s required `--socket` is missing (issue 19). Such a request is answered as
/// `ringfence help blk read`, whatever else the line holds. Nil when no help is asked for
/// or it names a single command (which the parser answers itself).
func subcommandHelpRequest(_ arguments: [String]) -> [String]? {
    guard arguments.contains(where: { $0 == "--help" || $0 == "-h" }) else { return nil }
    var command: any ParsableCommand.Type = RingFence.self
    var path: [String] = []
    for word in arguments where !word.hasPrefix("-") {
        guard let next = command.configuration.subcommands.first(where: { $0.configuration.commandName == word })
        else { continue }
        path.append(word)
        command = next
    }
    return path.count >= 2 ? ["help"] + path : nil
}

// Top-level entry (a module with several files cannot use @main in main.swift).
RingFence.main()
