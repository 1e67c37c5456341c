import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// README's shell completion commands: the script comes from the argument parser and
/// knows every command.
struct CompletionTests {
    @Test(arguments: ["bash", "zsh", "fish"])
    func completionScriptNamesTheCommands(shell: String) throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let r = try Interop.run([binary, "--generate-completion-script", shell])
        #expect(r.status == 0, "\(r.output)")
        for command in ["blk", "serve-blk", "audit", "xen-blk", "serve-xen-blk"] {
            #expect(r.output.contains(command), "\(shell) completion lacks \(command)")
        }
        #expect(r.output.contains("spin-us"), "options of subcommands are completed too")
    }

    /// The bash script as README installs it, loaded into a real bash: what a user gets
    /// after TAB (commands, subcommands after the parent's options, subcommand options;
    /// never a hidden old spelling).
    @Test func bashCompletesCommandsSubcommandsAndOptions() throws {
        let binary = try #require(Interop.ringfenceBinary, "build the ringfence binary first (swift build)")
        let script = try Interop.run([binary, "--generate-completion-script", "bash"])
        #expect(script.status == 0)
        let file = "/tmp/rf-completion-\(getpid()).bash"
        try script.output.write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let directory = URL(fileURLWithPath: binary).deletingLastPathComponent().path
        let program = """
            source \(file)
            export PATH=\(directory):$PATH
            try() {
                COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
                COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
                _ringfence ringfence "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"
                echo "$*|${COMPREPLY[*]}"
            }
            try ringfence xen-
            try ringfence blk --socket x.sock b
            try ringfence xen-net --socket x.sock bench --
            try ringfence serve-net --me
            """
        let r = try Interop.run(["/bin/bash", "-c", program])
        #expect(r.status == 0, "\(r.output)")
        let lines = Dictionary(
            r.output.split(separator: "\n").compactMap { line -> (String, [String])? in
                let parts = line.split(separator: "|", maxSplits: 1, omittingEmptySubsequences: false)
                guard parts.count == 2 else { return nil }
                return (String(parts[0]), parts[1].split(separator: " ").map(String.init))
            }, uniquingKeysWith: { a, _ in a })
        #expect(lines["ringfence xen-"] == ["xen-blk", "xen-net"], "\(r.output)")
        #expect(lines["ringfence blk --socket x.sock b"] == ["bench"])
        let bench = lines["ringfence xen-net --socket x.sock bench --"] ?? []
        #expect(bench.contains("--iodepth") && bench.contains("--runtime"), "\(bench)")
        #expect(!bench.contains("--depth"), "the old spelling is hidden")
        #expect(lines["ringfence serve-net --me"] == ["--metrics"])
    }
}
