import SharedMemory
import Testing
import XenRing

/// The code of the XenRing article "Use a Xen blk disk from async code", run as written.
@Test func articleUseAXenBlkDiskFromAsyncCodeRuns() async throws {
    let (front, back) = try UnixChannel.pair()
    let server = try spawnThread {
        let storage = MemoryStorage(sectors: 2048)  // 1 MiB in memory, the backend's
        guard let connection = try? XenBlkBackendConnection.accept(channel: back, storage: storage) else { return }
        _ = connection.run(idleTimeout: 60)
    }
    let disk = try AsyncXenBlkFrontend(XenBlkFrontendDevice.connect(channel: front))
    try await disk.write(sector: 8, bytes: [UInt8](repeating: 0x5a, count: 4096))
    let page = try await disk.read(sector: 8, count: 4096)
    try await disk.flush()
    #expect(page.allSatisfy { $0 == 0x5a })
    let pipe = disk.pipeline()
    for i in 0..<32 { try pipe.read(sector: UInt64(i) * 8, count: 4096, tag: UInt64(i)) }
    pipe.finish()
    var completed = 0
    for await c in pipe.completions {
        #expect(try c.result.get().count == 4096)
        completed += 1
    }
    #expect(completed == 32)
    disk.close()  // Closing -> Closed once idle
    server.join()
}
