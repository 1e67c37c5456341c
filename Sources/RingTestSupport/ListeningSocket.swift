import Foundation

/// Waiting for a server's Unix socket to accept connections, without connecting to it.
///
/// A socket file exists from `bind` on, a moment before `listen`: a client that connects
/// in between is refused. A file left by an earlier server at the same path looks the
/// same. Probing with `connect` is no answer either, since a vhost-user back-end takes the
/// first connection as its front-end. `/proc/net/unix` says whether a socket bound to the
/// path is listening (`__SO_ACCEPTCON`, flag 0x10000).
public enum ListeningSocket {
    /// Whether a socket bound to `path` (absolute, as the server bound it) is listening.
    public static func isListening(_ path: String) -> Bool {
        guard let table = try? String(contentsOfFile: "/proc/net/unix", encoding: .utf8) else { return false }
        for line in table.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 8, fields[7] == path, let flags = UInt32(fields[3], radix: 16) else { continue }
            if flags & 0x1_0000 != 0 { return true }
        }
        return false
    }

    /// Waits up to `seconds` for a listening socket at `path`; true when there is one.
    @discardableResult
    public static func wait(_ path: String, seconds: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !isListening(path) {
            if Date() >= deadline { return false }
            usleep(5_000)
        }
        return true
    }
}
