/// What a netif backend announces, validated (R3): `feature-rx-copy` must be on (we never
/// accept page flipping), `feature-gso-tcpv4` and `multi-queue-max-queues` are optional,
/// `mac` six hex octets.
public struct XenNetInfo: Equatable, Sendable {
    public var mac: [UInt8]
    public var gsoTCPv4: Bool
    public var maxQueues: UInt64
    public var scatterGather: Bool

    public init(
        mac: [UInt8] = [0x00, 0x16, 0x3e, 0x00, 0x00, 0x01], gsoTCPv4: Bool = true, maxQueues: UInt64 = 1,
        scatterGather: Bool = true
    ) {
        self.mac = mac
        self.gsoTCPv4 = gsoTCPv4
        self.maxQueues = maxQueues
        self.scatterGather = scatterGather
    }

    public var macString: String {
        mac.map { b in
            let s = String(b, radix: 16)
            return s.count == 1 ? "0" + s : s
        }.joined(separator: ":")
    }

    /// Parses `aa:bb:cc:dd:ee:ff` strictly (two hex digits each, six octets).
    public static func parseMAC(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard p.utf8.count == 2, let b = UInt8(p, radix: 16) else { return nil }
            out.append(b)
        }
        return out
    }

    /// The backend's node, checked: state InitWait, rx-copy on, the rest in range.
    public static func validate(_ node: XenStoreNode) throws(XenViolation) -> XenNetInfo {
        let state = try node.state()
        guard state == .initWait else {
            throw .xenHandshakeState(expected: XenbusState.initWait.rawValue, got: state.rawValue)
        }
        guard try node.flag("feature-rx-copy") else {
            throw .xenHandshakeValue(key: "feature-rx-copy", value: node["feature-rx-copy"] ?? "(missing)")
        }
        let queues = node["multi-queue-max-queues"] == nil ? 1 : try node.number("multi-queue-max-queues", in: 1...256)
        guard let macText = node["mac"], let mac = parseMAC(macText) else {
            throw .xenHandshakeValue(key: "mac", value: node["mac"] ?? "(missing)")
        }
        return XenNetInfo(
            mac: mac, gsoTCPv4: try node.flag("feature-gso-tcpv4"), maxQueues: queues,
            scatterGather: try node.flag("feature-sg"))
    }

    var node: XenStoreNode {
        XenStoreNode([
            "state": "\(XenbusState.initWait.rawValue)", "feature-rx-copy": "1",
            "feature-sg": scatterGather ? "1" : "0",
            "feature-gso-tcpv4": gsoTCPv4 ? "1" : "0", "multi-queue-max-queues": "\(maxQueues)", "mac": macString,
        ])
    }
}

/// What a netif frontend shares, validated by the backend (R3): state Initialised, the
/// x86_64 protocol, `request-rx-copy` and `feature-rx-notify` on, one queue, two distinct
/// ring refs inside the grant table.
struct XenNetFrontendRequest {
    var entries: UInt64
    var frames: UInt64
    var txRingRef: UInt32
    var rxRingRef: UInt32
    var gsoTCPv4: Bool

    static func validate(_ node: XenStoreNode) throws(XenViolation) -> XenNetFrontendRequest {
        let state = try node.state()
        guard state == .initialised else {
            throw .xenHandshakeState(expected: XenbusState.initialised.rawValue, got: state.rawValue)
        }
        guard node["protocol"] == "x86_64-abi" else {
            throw .xenHandshakeValue(key: "protocol", value: node["protocol"] ?? "(missing)")
        }
        for key in ["request-rx-copy", "feature-rx-notify"] where try !node.flag(key) {
            throw .xenHandshakeValue(key: key, value: node[key] ?? "(missing)")
        }
        if node["multi-queue-num-queues"] != nil {
            _ = try node.number("multi-queue-num-queues", in: 1...1)
        }
        let entries = try node.number("grant-entries", in: UInt64(GrantLayout.reservedEntries + 1)...65536)
        let frames = try node.number("grant-frames", in: 2...262_144)
        let tx = try node.number("tx-ring-ref", in: 0...(entries - 1))
        let rx = try node.number("rx-ring-ref", in: 0...(entries - 1))
        guard tx != rx else { throw .xenHandshakeValue(key: "rx-ring-ref", value: "\(rx)") }
        return XenNetFrontendRequest(
            entries: entries, frames: frames, txRingRef: UInt32(tx), rxRingRef: UInt32(rx),
            gsoTCPv4: try node.flag("feature-gso-tcpv4"))
    }
}
