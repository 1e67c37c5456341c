import Foundation
import RingFenceResults
import Testing

/// `ringfence fs` end to end against virtiofsd (one daemon per command: it exits when its
/// front-end leaves).
@Suite(
    "ringfence fs against virtiofsd", .serialized,
    .enabled(if: Virtiofsd.installed && ringfenceBuilt, "virtiofsd or the ringfence binary is missing"))
struct FsCommandTests {
    @Test func putListGetRemove() throws {
        let d = try Virtiofsd()
        let local = "\(d.directory)/local.bin"
        let data = Data(pattern(300_000, seed: 3))
        try data.write(to: URL(fileURLWithPath: local))
        let put = try ringfence(["fs", "--socket", d.socket, "put", local, "copy.bin"])
        #expect(put.status == 0, "\(put.stderr)")
        #expect(FileManager.default.contents(atPath: "\(d.shared)/copy.bin") == data)

        let d2 = try Virtiofsd(sharing: d)
        let ls = try ringfence(["fs", "--socket", d2.socket, "ls", "-l"])
        #expect(ls.status == 0)
        #expect(ls.stdout == "-rw-r--r-- 300000\tcopy.bin\n")

        let d3 = try Virtiofsd(sharing: d)
        let got = "\(d.directory)/got.bin"
        let get = try ringfence(["fs", "--socket", d3.socket, "get", "copy.bin", got])
        #expect(get.status == 0)
        #expect(FileManager.default.contents(atPath: got) == data)

        let d4 = try Virtiofsd(sharing: d)
        #expect(try ringfence(["fs", "--socket", d4.socket, "rm", "copy.bin"]).status == 0)
        #expect(!FileManager.default.fileExists(atPath: "\(d.shared)/copy.bin"))
    }

    @Test func missingFileExitsOneWithTheErrno() throws {
        let d = try Virtiofsd()
        let r = try ringfence(["fs", "--socket", d.socket, "stat", "nothing"])
        #expect(r.status == 1)
        #expect(r.stderr == "ringfence fs: error: device answered ENOENT (2)\n")
    }

    @Test func benchPrintsJSON() throws {
        let d = try Virtiofsd()
        let r = try ringfence(["fs", "--socket", d.socket, "bench", "--runtime", "0.2", "--size", "2M", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.isEmpty, "no progress without a terminal")
        let b = try JSONDecoder().decode(FsBenchResult.self, from: Data(r.stdout.utf8))
        #expect(b.statOps > 0 && b.lookupOps > 0 && b.randread4kOps > 0 && b.seqread1mMibS > 0 && b.runtime == 200)
    }
}
