#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
public import SystemPackage

/// A failed system call: which call, and the `errno` it left.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public let operation: String
    public let errno: Errno

    public init(_ operation: String, errno: Errno) {
        self.operation = operation
        self.errno = errno
    }

    /// Captures the current thread's `errno`; call immediately after the failing call.
    public static func current(_ operation: String) -> SystemError {
        SystemError(operation, errno: Errno(rawValue: Glibc.errno))
    }

    public var description: String { "\(operation): \(errno)" }
}

/// Runs a system call, retrying on EINTR, and turns -1 into a typed error.
@inline(__always)
func retrying<T: FixedWidthInteger>(
    _ operation: String, _ body: () -> T
) throws(SystemError) -> T {
    while true {
        let result = body()
        if result != -1 { return result }
        let error = Glibc.errno
        if error == EINTR { continue }
        throw SystemError(operation, errno: Errno(rawValue: error))
    }
}

/// Closes a descriptor, ignoring errors (close may not be retried on Linux).
@inline(__always)
public func closeDescriptor(_ fd: Int32) {
    if fd >= 0 { _ = Glibc.close(fd) }
}
