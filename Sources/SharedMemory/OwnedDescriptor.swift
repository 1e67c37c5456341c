#if canImport(Glibc)
import Glibc
#endif

/// A file descriptor with exactly one owner: closed when the owner goes away, unless it
/// was handed on with `take()`. Move-only, so two owners (and a double close that hits
/// another thread's newly opened descriptor) cannot be written.
public struct OwnedDescriptor: ~Copyable {
    public let rawValue: Int32

    public init(_ rawValue: Int32) { self.rawValue = rawValue }

    /// Hands the descriptor on to a new owner (who must close it); this one closes nothing.
    public consuming func take() -> Int32 {
        let fd = rawValue
        discard self
        return fd
    }

    deinit { closeDescriptor(rawValue) }
}

/// Descriptors received in one message: each is taken out at most once, and those never
/// taken are closed with the batch. A class (not an array of `OwnedDescriptor`) because
/// the message's descriptors are handed out one by one to different owners.
public final class ReceivedDescriptors {
    private var descriptors: [Int32]

    public init(_ descriptors: [Int32]) { self.descriptors = descriptors }

    deinit { for fd in descriptors where fd >= 0 { closeDescriptor(fd) } }

    public var count: Int { descriptors.count }

    /// The `index`th descriptor, now owned by the caller; nil if out of range or taken.
    public func take(_ index: Int) -> OwnedDescriptor? {
        guard index >= 0, index < descriptors.count, descriptors[index] >= 0 else { return nil }
        let fd = descriptors[index]
        descriptors[index] = -1
        return OwnedDescriptor(fd)
    }

    /// The raw values (for logging and hooks); still owned by this batch.
    public var rawValues: [Int32] { descriptors }
}

/// What a descriptor received from a peer turned out to be. Every transport checks this
/// before using one (R3): a pipe where an eventfd belongs can raise SIGPIPE or stay
/// readable forever, a regular file or memfd is always readable (a busy loop).
public enum DescriptorKind: Equatable, Sendable, CustomStringConvertible {
    case eventfd
    case memfd
    case other(String)

    /// Looks the descriptor up in /proc/self/fd (no I/O on the descriptor itself).
    public static func of(_ fd: Int32) -> DescriptorKind {
        var buffer = [CChar](repeating: 0, count: 256)
        let n = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
        guard n > 0 else { return .other("unreadable") }
        let target = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if target == "anon_inode:[eventfd]" { return .eventfd }
        if target.hasPrefix("/memfd:") { return .memfd }
        if target.hasPrefix("pipe:") { return .other("pipe") }
        if target.hasPrefix("socket:") { return .other("socket") }
        if target.hasPrefix("anon_inode:") { return .other(target) }
        return .other("file")
    }

    public var description: String {
        switch self {
        case .eventfd: return "eventfd"
        case .memfd: return "memfd"
        case .other(let what): return what
        }
    }
}

/// A descriptor a peer sent is not what the protocol says belongs there.
public struct DescriptorKindError: Error, Equatable, Sendable, CustomStringConvertible {
    public let expected: DescriptorKind
    public let found: DescriptorKind

    public init(expected: DescriptorKind, found: DescriptorKind) {
        self.expected = expected
        self.found = found
    }

    public var description: String { "descriptor is a \(found), not a \(expected)" }
}
