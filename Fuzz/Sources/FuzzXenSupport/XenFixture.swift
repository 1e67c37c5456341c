public import SharedMemory
public import XenRing

/// One frontend/backend pair on a grant table and frames (two sealed memfds), rebuilt per
/// input so no state leaks between runs.
public final class XenFuzzPair {
    public let table: SharedRegion
    public let frames: SharedRegion
    public let memory: GrantTableMemory
    public let storage: MemoryStorage

    public init?(frameCount: Int = 32, sectors: Int = 256) {
        guard let table = try? SharedRegion(name: "fuzz-grants", size: 4096),
            let frames = try? SharedRegion(name: "fuzz-frames", size: frameCount * 4096)
        else { return nil }
        self.table = table
        self.frames = frames
        memory = GrantTableMemory(entries: table.base, entryCount: 512, frames: frames.base, frameCount: frameCount)
        storage = MemoryStorage(sectors: sectors)
    }

    public func reset() {
        table.base.initializeMemory(as: UInt8.self, repeating: 0, count: table.size)
        frames.base.initializeMemory(as: UInt8.self, repeating: 0, count: frames.size)
    }

    public var ring: UnsafeMutableRawPointer { memory.page(0) }
}
