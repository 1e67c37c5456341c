import Foundation
import Testing

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
}
