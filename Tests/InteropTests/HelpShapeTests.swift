import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// One help shape for every transport command and each of its subcommands (issue 19),
/// read from the built binary's `--help` as a user reads it: an abstract, examples that
/// start with `ringfence` and name the command, every option described, and one
/// spelling per meaning across all of them.
@Suite(.enabled(if: ringfenceBuilt, "the ringfence executable is not built"))
struct HelpShapeTests {
    static let transports = ["blk", "xen-blk", "net", "fs", "xen-net"]
    /// The servers: no subcommands, the same shape.
    static let servers = ["serve-blk", "serve-net", "serve-fs", "serve-xen-blk", "serve-xen-net"]

    /// An option as `--help` lists it: its long name and its description.
    struct Option: Equatable {
        var name: String
        var description: String
    }

    struct Help {
        var path: [String]
        var text: String
        var abstract: String
        /// The lines between the abstract and USAGE.
        var discussion: [String]
        var options: [Option]
        var subcommands: [String]
    }

    static func section(_ lines: [String], _ title: String) -> [String] {
        guard let start = lines.firstIndex(where: { $0.uppercased() == $0 && $0.hasSuffix(":") && $0.contains(title) })
        else { return [] }
        return Array(lines[(start + 1)...].prefix { !$0.isEmpty })
    }

    static func help(_ path: [String]) throws -> Help {
        let r = try ringfence(path + ["--help"])
        #expect(r.status == 0, "\(path) --help: \(r.stderr)")
        let lines = r.stdout.components(separatedBy: "\n")
        let abstract = lines.first.map { $0.hasPrefix("OVERVIEW: ") ? String($0.dropFirst(10)) : "" } ?? ""
        let usage = lines.firstIndex { $0.hasPrefix("USAGE:") } ?? lines.count
        let discussion = Array(lines[min(1, usage)..<usage])
        // Options of every section (OPTIONS, VERIFIED PAYLOAD, ...): an entry starts with
        // two spaces and a dash; its description may begin on the next, indented line.
        var options: [Option] = []
        var inOptions = false
        for line in lines[usage...] {
            if line.hasSuffix(":") && line.uppercased() == line && !line.hasPrefix(" ") {
                inOptions = !line.hasPrefix("SUBCOMMANDS") && !line.hasPrefix("ARGUMENTS") && !line.hasPrefix("USAGE")
                continue
            }
            guard inOptions, !line.isEmpty else { continue }
            if line.hasPrefix("  -") {
                let words = line.split(separator: " ", omittingEmptySubsequences: true)
                let long = words.first { $0.hasPrefix("--") }.map { String($0.drop { $0 == "-" }) } ?? ""
                let name = long.split(separator: ",").first.map(String.init) ?? long
                let split = line.dropFirst(2).range(of: "  ")
                let description = split.map { line.dropFirst(2)[$0.upperBound...].trimmingCharacters(in: .whitespaces) }
                options.append(Option(name: name, description: description ?? ""))
            } else if var last = options.popLast() {
                last.description += (last.description.isEmpty ? "" : " ") + line.trimmingCharacters(in: .whitespaces)
                options.append(last)
            }
        }
        let subcommands = section(lines, "SUBCOMMANDS").compactMap { line -> String? in
            guard line.hasPrefix("  "), !line.hasPrefix("   ") else { return nil }
            return line.split(separator: " ").first.map(String.init)
        }
        return Help(
            path: path, text: r.stdout, abstract: abstract, discussion: discussion, options: options,
            subcommands: subcommands)
    }

    /// Every transport command and subcommand, walked through the SUBCOMMANDS sections.
    static func all() throws -> [Help] {
        var result: [Help] = []
        for command in transports {
            let parent = try help([command])
            result.append(parent)
            for sub in parent.subcommands where sub != "help" {
                result.append(try help([command, sub]))
            }
        }
        for server in servers {
            let h = try help([server])
            #expect(h.subcommands.isEmpty, "\(server) has subcommands")
            result.append(h)
        }
        return result
    }

    /// Meanings whose spelling is fixed, recognized by their description.
    static let spellings: [(pattern: String, name: String)] = [
        ("in flight", "iodepth"),
        ("seconds to run", "runtime"),
        ("json", "json"),
        ("pattern seed", "seed"),
        ("byte offset", "offset"),
        ("deadline in seconds", "timeout"),
        ("path of the back-end's", "socket"),
    ]

    @Test func everyTransportCommandHasAnAbstractExamplesAndDescribedOptions() throws {
        let all = try Self.all()
        #expect(all.count > 40, "walked \(all.map { $0.path.joined(separator: " ") })")
        #expect(Set(all.map { $0.path[0] }) == Set(Self.transports + Self.servers))
        for h in all {
            let name = h.path.joined(separator: " ")
            #expect(!h.abstract.isEmpty, "\(name): no abstract")
            // `ringfence blk read --help` is read's help, not blk's.
            let usage = "USAGE: ringfence \(name)"
            #expect(
                h.text.split(separator: "\n").contains { $0 == usage || $0.hasPrefix(usage + " ") },
                "\(name) --help shows another command's help")
            // Examples: one line each (never wrapped), at least one running this command.
            let block = h.discussion.drop { $0 != "Examples:" }.dropFirst().prefix { !$0.isEmpty }
            #expect(!block.isEmpty, "\(name): no Examples")
            for line in block {
                #expect(line.hasPrefix("  ringfence "), "\(name): example line \(line) is not a ringfence command")
            }
            let ours = block.map { $0.split(separator: " ").map(String.init) }.filter { words in
                words.count > 1 && words[1] == h.path[0] && (h.path.count == 1 || words.contains(h.path[1]))
            }
            #expect(!ours.isEmpty, "\(name): no example runs it")
            for o in h.options where o.name != "help" {
                #expect(!o.description.isEmpty, "\(name): --\(o.name) has no description")
            }
        }
    }

    /// Every example of a command parses: run against a socket that does not exist, it
    /// fails to connect (exit 1), never with a usage error (exit 2).
    @Test func everyExampleParses() throws {
        // The local files the examples read, 4 KiB each; stdin holds 4 KiB too.
        let dir = "/tmp/rf-help-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let inputs = ["in.bin", "local.bin", "notes.txt", "disk.img", "shared"]
        for file in inputs where file != "shared" {
            #expect(FileManager.default.createFile(atPath: "\(dir)/\(file)", contents: Data(count: 4096)))
        }
        try FileManager.default.createDirectory(atPath: "\(dir)/shared", withIntermediateDirectories: true)
        for h in try Self.all() {
            let block = h.discussion.drop { $0 != "Examples:" }.dropFirst().prefix { !$0.isEmpty }
            for line in block {
                var words = line.split(separator: " ").map(String.init)
                guard words.count > 1, words[1] == h.path[0] else { continue }
                // Up to a pipe or a redirection: the command itself.
                if let end = words.firstIndex(where: { ["|", "<", ">", "&"].contains($0) }) {
                    words = Array(words[..<end])
                }
                // Every socket (a server may listen on several) and every metrics
                // endpoint points where nothing can be bound or reached.
                for i in words.indices.dropLast() where words[i] == "--socket" {
                    words[i + 1] = "/nonexistent/ringfence-help.sock"
                }
                if let metrics = words.firstIndex(of: "--metrics"), metrics + 1 < words.count {
                    words[metrics + 1] = "\(dir)/metrics.sock"
                }
                words = words.map { inputs.contains($0) ? "\(dir)/\($0)" : $0 }
                if Self.servers.contains(h.path[0]) {
                    // A server that does not fail would serve forever: bounded, it is
                    // killed (exit 137) and the expectation names it.
                    let r = try ringfence(Array(words.dropFirst()), timeout: 20)
                    #expect(r.status == 1, "\(line): exit \(r.status): \(r.stderr)")
                    // One line naming the command, as the transport commands do.
                    #expect(
                        r.stderr.split(separator: "\n").contains { $0.hasPrefix("ringfence \(h.path[0]): error: ") },
                        "\(line): \(r.stderr)")
                    continue
                }
                let r = try ringfence(Array(words.dropFirst()), stdin: Data(count: 4096))
                #expect(r.status == 1, "\(line): exit \(r.status): \(r.stderr)")
            }
        }
    }

    @Test func noOptionIsSpelledTwoWays() throws {
        let all = try Self.all()
        // The same description under two names is one meaning spelled two ways.
        var names: [String: Set<String>] = [:]
        for h in all {
            let name = h.path.joined(separator: " ")
            for o in h.options where o.name != "help" {
                let first = o.description.split(separator: "(").first.map(String.init) ?? o.description
                names[first.trimmingCharacters(in: .whitespaces).lowercased(), default: []].insert(o.name)
                for (pattern, spelling) in Self.spellings where o.description.lowercased().contains(pattern) {
                    #expect(o.name == spelling, "\(name): --\(o.name) (\(o.description)) means --\(spelling)")
                }
            }
        }
        for (description, spellings) in names where spellings.count > 1 {
            Issue.record("\"\(description)\" is spelled \(spellings.sorted().map { "--" + $0 })")
        }
    }

    /// A server's bad option value is a usage error of that server (exit 2, its own usage
    /// line), found before anything is bound; a failure to serve is one line naming it, exit 1.
    @Test func serversSayWhatFailedAsTheTransportCommandsDo() throws {
        let usage: [[String]] = [
            ["serve-blk", "--socket", "/tmp/rf-none.sock", "--image", "/etc/hostname", "--queues", "0"],
            ["serve-net", "--socket", "/tmp/rf-none.sock", "--sink", "--mtu", "10"],
            ["serve-fs", "--socket", "/tmp/rf-none.sock", "--dir", "/tmp", "--queues", "0"],
            ["serve-xen-net", "--socket", "/tmp/rf-none.sock", "--idle", "0"],
        ]
        for arguments in usage {
            let r = try ringfence(arguments, timeout: 20)
            #expect(r.status == 2, "\(arguments): \(r.stderr)")
            #expect(r.stderr.contains("Usage: ringfence \(arguments[0]) "), "\(arguments): \(r.stderr)")
        }
        let missing = try ringfence(
            ["serve-fs", "--socket", "/tmp/rf-none.sock", "--dir", "/nonexistent/dir"], timeout: 20)
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("ringfence serve-fs: error: open(/nonexistent/dir)"), "\(missing.stderr)")
        let image = try ringfence(
            ["serve-blk", "--socket", "/tmp/rf-none.sock", "--image", "/nonexistent/img"], timeout: 20)
        #expect(image.status == 1)
        #expect(image.stderr.contains("ringfence serve-blk: error: open(/nonexistent/img)"), "\(image.stderr)")
    }

    /// The old spellings stay accepted, hidden: `xen-net bench --depth` is `--iodepth`.
    @Test func hiddenAliasesStillWork() throws {
        let help = try ringfence(["xen-net", "bench", "--help"]).stdout
        #expect(help.contains("--iodepth") && !help.contains("--depth"), "\(help)")
        let bad = try ringfence(["xen-net", "--socket", "/nonexistent", "bench", "--depth", "0"])
        #expect(bad.status == 2, "\(bad.stderr)")
        #expect(bad.stderr.contains("--iodepth must be 1...128"), "\(bad.stderr)")
        let both = try ringfence(["xen-net", "--socket", "/nonexistent", "bench", "--depth", "4", "--iodepth", "8"])
        #expect(both.status == 2 && both.stderr.contains("--iodepth"), "\(both.stderr)")
        let old = try ringfence(["xen-net", "--socket", "/nonexistent", "bench", "--depth", "4", "--runtime", "0.1"])
        #expect(old.status == 1, "--depth 4 is accepted; the connection fails: \(old.stderr)")
    }
}
