import VirtioBlock

/// The code of the VirtioBlock article "Talk to a vhost-user-blk back-end", compiled here
/// so the article cannot rot (not run: it needs a back-end on /tmp/blk.sock;
/// `AsyncCallTests` run the same calls against the real device).
func articleTalkToAVhostUserBlkBackend() async throws {
    var options = VirtioBlockDriver.Options()
    options.requestTimeout = 10  // seconds per request (R5)
    let disk = try VirtioBlockDriver.connect(socket: "/tmp/blk.sock", options: options)
    defer { disk.close() }
    print("capacity \(disk.info.capacityBytes) bytes, block size \(disk.info.blockSize)")
    try await disk.write(at: 0, bytes: [UInt8](repeating: 0xab, count: 4096))
    let blocks = try await withThrowingTaskGroup(of: [UInt8].self) { group in
        for i in 0..<128 { group.addTask { try await disk.read(at: UInt64(i % 16) * 4096, count: 4096) } }
        return try await group.reduce(into: [[UInt8]]()) { $0.append($1) }
    }
    print(blocks.count, "reads")
    do {
        _ = try await disk.read(at: 0, count: 4096)
    } catch let error as VirtioError {
        if let rule = error.rule { print("device broke \(rule): \(error)") } else { print(error) }
    } catch is CancellationError {
        print("cancelled; the request keeps its memory until the device answers")
    }
    let pipe = try disk.pipeline()
    for i in 0..<32 { try pipe.read(at: UInt64(i) * 4096, count: 4096, tag: UInt64(i)) }
    pipe.finish()
    for await completion in pipe.completions {
        print(completion.tag, (try? completion.result.get().count) ?? -1)
    }
}
