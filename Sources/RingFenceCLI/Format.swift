/// Fixed-point formatting without Foundation.
func format(_ value: Double, _ decimals: Int) -> String {
    guard value.isFinite else { return "\(value)" }
    var scale = 1.0
    for _ in 0..<max(0, decimals) { scale *= 10 }
    let scaled = (abs(value) * scale).rounded()
    guard scaled < 9e18 else { return "\(value)" }
    let n = UInt64(scaled)
    let whole = n / UInt64(scale)
    let frac = n % UInt64(scale)
    var s = (value < 0 && n != 0 ? "-" : "") + "\(whole)"
    if decimals > 0 {
        let f = String(frac)
        s += "." + String(repeating: "0", count: decimals - f.count) + f
    }
    return s
}

/// The discussion of a transport command's `--help` (one shape for all, issue 19): what
/// to know, then runnable examples, each one line (at most 78 columns, so it never wraps).
func helpDiscussion(_ text: String, examples: String...) -> String {
    (text.isEmpty ? "" : text + "\n\n") + "Examples:\n" + examples.map { "  " + $0 }.joined(separator: "\n")
}
