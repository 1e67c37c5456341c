/// Frames in private memory, for the batch calls (`NetQueuePair.transmit` /
/// `receive`): `capacity` slots of `frameCapacity` bytes each, allocated once; appending,
/// reading and clearing allocate nothing.
public final class NetFrameBatch {
    public let capacity: Int
    public let frameCapacity: Int
    public private(set) var count = 0
    let storage: UnsafeMutableRawPointer
    let lengths: UnsafeMutablePointer<Int>

    public init(capacity: Int, frameCapacity: Int) {
        self.capacity = max(1, capacity)
        self.frameCapacity = max(1, frameCapacity)
        storage = .allocate(byteCount: self.capacity * self.frameCapacity, alignment: 64)
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: self.capacity * self.frameCapacity)
        lengths = .allocate(capacity: self.capacity)
        lengths.initialize(repeating: 0, count: self.capacity)
    }

    deinit {
        storage.deallocate()
        lengths.deallocate()
    }

    public var isFull: Bool { count == capacity }

    public func removeAll() { count = 0 }

    /// Frame `i` (0..<count).
    public subscript(i: Int) -> UnsafeRawBufferPointer {
        guard i >= 0, i < count else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(start: storage + i * frameCapacity, count: lengths[i])
    }

    public func bytes(_ i: Int) -> [UInt8] { Array(self[i]) }

    /// Appends a copy of `frame`; false if the batch is full or the frame too long.
    @discardableResult
    public func append(_ frame: UnsafeRawBufferPointer) -> Bool {
        guard count < capacity, frame.count <= frameCapacity else { return false }
        if let src = frame.baseAddress {
            (storage + count * frameCapacity).copyMemory(from: src, byteCount: frame.count)
        }
        lengths[count] = frame.count
        count += 1
        return true
    }

    @discardableResult
    public func append(_ frame: [UInt8]) -> Bool { frame.withUnsafeBytes { append($0) } }

    /// Appends a frame of `length` bytes that `fill` writes in place (no copy).
    @discardableResult
    public func append(length: Int, _ fill: (UnsafeMutableRawBufferPointer) -> Void) -> Bool {
        guard count < capacity, length >= 0, length <= frameCapacity else { return false }
        fill(UnsafeMutableRawBufferPointer(start: storage + count * frameCapacity, count: length))
        lengths[count] = length
        count += 1
        return true
    }

    /// The next free slot, for a receive that copies straight into it.
    @inline(__always)
    var nextSlot: UnsafeMutableRawPointer? { count < capacity ? storage + count * frameCapacity : nil }

    @inline(__always)
    func commit(length: Int) {
        lengths[count] = length
        count += 1
    }
}
