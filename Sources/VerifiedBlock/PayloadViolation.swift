public import SharedMemory

/// A payload lie the verified layer caught: the back-end returned bytes that are not the
/// block's current sealed content. The first one breaks the device (R6); the bytes never
/// reach the caller. The naming (wrong block, stale version, ...) reads the slot's record,
/// which the back-end also controls: detection is certain, the name is best effort.
public enum PayloadViolation: RuleViolation, Equatable {
    /// The record names this block and version but the sealed data does not authenticate
    /// (flipped bits, or another key's or device's data).
    case tagMismatch(block: UInt64)
    /// The slot holds a record of another block (the back-end returned another block's data).
    case wrongBlock(block: UInt64, got: UInt64)
    /// The slot holds an older version of this block (replay of an old block).
    case staleVersion(block: UInt64, expected: UInt64, got: UInt64)
    /// The slot holds no record of the version we wrote (a write acknowledged but not stored).
    case writeNotStored(block: UInt64, version: UInt64)
    /// Some blocks of one multi-block write hold the new version, others not.
    case tornWrite(firstBlock: UInt64, blocks: Int, missing: UInt64)
    /// The device's metadata is older than the anchored root (the whole device rolled back).
    case rolledBackRoot(anchoredVersion: UInt64, deviceVersion: UInt64)
    /// The device's metadata does not hash to the anchored root (altered, not only older).
    case rootMismatch
    /// The superblock does not describe the device the anchor was made for.
    case deviceMismatch(String)
    /// Verity mode: a data or hash block does not hash to its verified parent.
    case hashMismatch(level: Int, block: UInt64)
    /// Verity mode: the image's hash tree does not lead to the root hash given.
    case rootHashMismatch

    public var rule: Rule { .r3 }

    public var detail: String {
        switch self {
        case .tagMismatch(let b):
            return "verified block \(b): sealed data does not authenticate (tag mismatch)"
        case .wrongBlock(let b, let got):
            return "verified block \(b): back-end returned block \(got) (wrong block)"
        case .staleVersion(let b, let expected, let got):
            return "verified block \(b): back-end returned version \(got), current is \(expected) (stale version)"
        case .writeNotStored(let b, let v):
            return "verified block \(b): version \(v) was acknowledged but is not stored (write not stored)"
        case .tornWrite(let first, let n, let missing):
            return "verified blocks \(first)+\(n): one write, block \(missing) missing from the device (torn write)"
        case .rolledBackRoot(let anchored, let device):
            return "device metadata is at version \(device), the anchor at \(anchored) (rolled-back root)"
        case .rootMismatch:
            return "device metadata does not hash to the anchored root (root mismatch)"
        case .deviceMismatch(let why):
            return "not the anchored device: \(why)"
        case .hashMismatch(let level, let b):
            return "verity: \(level == 0 ? "data" : "hash") block \(b) at level \(level) does not match its hash"
        case .rootHashMismatch:
            return "verity: the image's hash tree does not lead to the given root hash"
        }
    }
}

/// Why a verified-block operation failed. `.violation` is a payload lie (device broken,
/// sticky); `.transport` a failure of the transport below (also breaks the device, since
/// what was stored is then unknown); the rest are local refusals.
public enum VerifiedBlockError: Error, Equatable, CustomStringConvertible {
    case violation(PayloadViolation)
    case transport(TransportError)
    /// The anchor or key file could not be used (local, not the back-end's fault).
    case local(String)
    /// Refused locally: outside the device or not whole blocks.
    case invalidRequest(String)
    /// Verity mode is read-only.
    case readOnly

    /// The back-end's violation, if the failure is one.
    public var violationCause: (any RuleViolation)? {
        if case .violation(let v) = self { return v }
        return nil
    }

    public var description: String {
        switch self {
        case .violation(let v): return v.description
        case .transport(let e): return e.description
        case .local(let why): return why
        case .invalidRequest(let why): return "invalid request: \(why) (refused locally)"
        case .readOnly: return "verity device is read-only (refused locally)"
        }
    }
}
