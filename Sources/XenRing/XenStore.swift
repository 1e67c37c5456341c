public import SharedMemory

/// A xenstore directory as one handshake message: `key=value` lines, length-prefixed.
///
/// The peer writes these, so decoding is strict (R3/R4): bounded size and key count,
/// keys `[a-z0-9-]`, printable values, decimal numbers that must fit, no duplicates.
public struct XenStoreNode: Equatable, Sendable {
    /// The keys and values.
    public private(set) var values: [String: String] = [:]
    /// Largest encoded node accepted.
    public static let maximumBytes = 4096
    /// Most keys accepted in one node.
    public static let maximumKeys = 32

    /// A node holding `values`.
    public init(_ values: [String: String] = [:]) { self.values = values }

    /// The value of `key`, if present.
    public subscript(key: String) -> String? {
        get { values[key] }
        set { values[key] = newValue }
    }

    /// A 4-byte little-endian length, then `key=value` lines sorted by key.
    public var encoded: [UInt8] {
        var body: [UInt8] = []
        for key in values.keys.sorted() {
            body += Array(key.utf8) + [UInt8(ascii: "=")] + Array((values[key] ?? "").utf8) + [10]
        }
        let n = UInt32(body.count)
        return [UInt8(n & 0xff), UInt8((n >> 8) & 0xff), UInt8((n >> 16) & 0xff), UInt8(n >> 24)] + body
    }

    /// Parses `key=value` lines, refusing more than `maximumKeys` keys, malformed keys or
    /// values, and duplicates (R3).
    public static func decode(body: [UInt8]) throws(XenViolation) -> XenStoreNode {
        var node = XenStoreNode()
        var count = 0
        for line in body.split(separator: 10, omittingEmptySubsequences: true) {
            count += 1
            guard count <= maximumKeys, let eq = line.firstIndex(of: UInt8(ascii: "=")) else {
                throw .xenHandshakeValue(key: "(message)", value: "malformed line")
            }
            let k = line[line.startIndex..<eq]
            let v = line[(eq + 1)...]
            guard !k.isEmpty, k.count <= 64,
                k.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2d }),
                v.count <= 256, v.allSatisfy({ $0 >= 0x20 && $0 < 0x7f })
            else { throw .xenHandshakeValue(key: "(message)", value: "malformed key or value") }
            let key = String(decoding: k, as: UTF8.self)
            guard node.values[key] == nil else { throw .xenHandshakeValue(key: key, value: "duplicate") }
            node.values[key] = String(decoding: v, as: UTF8.self)
        }
        return node
    }

    /// A decimal value in `range`; anything else is a typed violation, never a trap.
    public func number(_ key: String, in range: ClosedRange<UInt64>) throws(XenViolation) -> UInt64 {
        guard let text = values[key] else { throw .xenHandshakeValue(key: key, value: "(missing)") }
        guard !text.isEmpty, text.utf8.count <= 20, text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
            let n = UInt64(text), range.contains(n)
        else { throw .xenHandshakeValue(key: key, value: text) }
        return n
    }

    /// "0" or "1"; absent means `default`.
    public func flag(_ key: String, default value: Bool = false) throws(XenViolation) -> Bool {
        guard let text = values[key] else { return value }
        switch text {
        case "0": return false
        case "1": return true
        default: throw .xenHandshakeValue(key: key, value: text)
        }
    }

    /// The `state` key as a `XenbusState` (refused if missing or unknown).
    public func state() throws(XenViolation) -> XenbusState {
        let n = try number("state", in: 0...8)
        guard let s = XenbusState(rawValue: UInt8(n)) else { throw .xenHandshakeValue(key: "state", value: "\(n)") }
        return s
    }
}

/// Why connecting (or serving a connection) failed.
public enum XenConnectError: Error, Equatable, CustomStringConvertible {
    /// The socket failed or the peer went away.
    case channel(UnixChannel.Error)
    /// The peer broke a rule of the handshake.
    case violation(XenViolation)
    /// Setting up our side failed (memory, eventfds).
    case setup(String)

    /// The node as `key=value` pairs.
    public var description: String {
        switch self {
        case .channel(let e): return "control channel: \(e)"
        case .violation(let v): return "peer violated \(v)"
        case .setup(let s): return "setup failed: \(s)"
        }
    }
}

extension UnixChannel {
    /// Sends one node (with descriptors attached).
    public func sendNode(_ node: XenStoreNode, descriptors: [Int32] = [], until deadline: Deadline)
        throws(XenConnectError)
    {
        do { try send(node.encoded, descriptors: descriptors, until: deadline) } catch { throw .channel(error) }
    }

    /// Receives one node with at most `maxDescriptors` descriptors; surplus ones are
    /// closed by the channel, and those the caller does not take are closed with the batch.
    public func receiveNode(maxDescriptors: Int, until deadline: Deadline) throws(XenConnectError) -> (
        XenStoreNode, ReceivedDescriptors
    ) {
        var header = [UInt8](repeating: 0, count: 4)
        let first = header.withUnsafeMutableBytes { b in
            Result { () throws(UnixChannel.Error) in
                try receive(exactly: b, maxDescriptors: maxDescriptors, until: deadline)
            }
        }
        let fds: ReceivedDescriptors
        switch first {
        case .success(let f): fds = ReceivedDescriptors(f)
        case .failure(let e): throw .channel(e)
        }
        let n = Int(header[0]) | Int(header[1]) << 8 | Int(header[2]) << 16 | Int(header[3]) << 24
        guard n <= XenStoreNode.maximumBytes else {
            throw .violation(.xenHandshakeValue(key: "(message)", value: "\(n) bytes"))
        }
        var body = [UInt8](repeating: 0, count: n)
        if n > 0 {
            let rest = body.withUnsafeMutableBytes { b in
                Result { () throws(UnixChannel.Error) in try receive(exactly: b, maxDescriptors: 0, until: deadline) }
            }
            switch rest {
            case .success(let more): _ = ReceivedDescriptors(more)
            case .failure(let e): throw .channel(e)
            }
        }
        do { return (try XenStoreNode.decode(body: body), fds) } catch { throw .violation(error) }
    }
}

/// What the backend announces, after clamping (R3: "capacities that fit").
public struct XenBlkInfo: Equatable, Sendable {
    /// Capacity in 512-byte sectors (blkif's unit, whatever `sector-size` says).
    public var sectors: UInt64
    /// Logical sector size the backend announced (512...4096); blkif sectors stay 512 bytes.
    public var sectorSize: UInt32
    /// The backend accepts BLKIF_OP_FLUSH_DISKCACHE.
    public var flushCache: Bool
    /// The backend accepts BLKIF_OP_DISCARD.
    public var discard: Bool
    /// Mode "r": the backend refuses writes.
    public var readOnly: Bool

    /// Disk parameters as a backend announces them.
    public init(
        sectors: UInt64, sectorSize: UInt32 = 512, flushCache: Bool = true, discard: Bool = true, readOnly: Bool = false
    ) {
        self.sectors = sectors
        self.sectorSize = sectorSize
        self.flushCache = flushCache
        self.discard = discard
        self.readOnly = readOnly
    }

    /// At most 8 PiB: sectors * 512 then fits comfortably in 64 bits.
    public static let maximumSectors: UInt64 = 1 << 44

    /// Reads and clamps the backend's node: `sectors` 1...2^44, `sector-size` a power of
    /// two in 512...4096, features "0"/"1", `mode` "r"/"w".
    public static func validate(_ node: XenStoreNode) throws(XenViolation) -> XenBlkInfo {
        let state = try node.state()
        guard state == .initWait else {
            throw .xenHandshakeState(expected: XenbusState.initWait.rawValue, got: state.rawValue)
        }
        let sectors = try node.number("sectors", in: 1...maximumSectors)
        let size = try node.number("sector-size", in: 512...4096)
        guard size & (size - 1) == 0 else { throw .xenHandshakeValue(key: "sector-size", value: "\(size)") }
        let mode = node["mode"] ?? "w"
        guard mode == "r" || mode == "w" else { throw .xenHandshakeValue(key: "mode", value: mode) }
        return XenBlkInfo(
            sectors: sectors, sectorSize: UInt32(size), flushCache: try node.flag("feature-flush-cache"),
            discard: try node.flag("feature-discard"), readOnly: mode == "r")
    }

    var node: XenStoreNode {
        XenStoreNode([
            "state": "\(XenbusState.initWait.rawValue)", "sectors": "\(sectors)", "sector-size": "\(sectorSize)",
            "feature-flush-cache": flushCache ? "1" : "0", "feature-discard": discard ? "1" : "0",
            "mode": readOnly ? "r" : "w",
        ])
    }
}
