import Crypto
import Foundation

/// AES-256-GCM over one 4 KiB block. The key comes from the 32-byte key file through
/// HKDF-SHA256 salted with the device identity; the nonce is the block's version, a
/// counter unique per device and reserved durably in the anchor before use, so no
/// (key, nonce) pair repeats even across crashes; the associated data binds device,
/// block index and version.
struct BlockSealer {
    let key: SymmetricKey
    let deviceID: [UInt8]

    init(keyMaterial: [UInt8], deviceID: [UInt8]) {
        key = HKDF<SHA256>.deriveKey(
            inputKeyMaterial: SymmetricKey(data: keyMaterial), salt: deviceID,
            info: Array("ringfence verified-block v1 data".utf8), outputByteCount: 32)
        self.deviceID = deviceID
    }

    func associatedData(block: UInt64, version: UInt64) -> [UInt8] {
        var ad = [UInt8](repeating: 0, count: 32)
        ad.put(deviceID, at: 0)
        ad.putLE(block, at: 16)
        ad.putLE(version, at: 24)
        return ad
    }

    static func nonceBytes(version: UInt64) -> [UInt8] {
        var n = [UInt8](repeating: 0, count: 12)
        n.putLE(version, at: 0)
        return n
    }

    /// Seals `plain` into `out` (same size) and returns the 16-byte tag.
    func seal(_ plain: UnsafeRawBufferPointer, block: UInt64, version: UInt64, into out: UnsafeMutableRawBufferPointer)
        -> [UInt8]?
    {
        guard let nonce = try? AES.GCM.Nonce(data: Self.nonceBytes(version: version)),
            let box = try? AES.GCM.seal(
                plain, using: key, nonce: nonce, authenticating: associatedData(block: block, version: version))
        else { return nil }
        let ct = box.ciphertext
        guard ct.count == out.count else { return nil }
        ct.copyBytes(to: out)
        return Array(box.tag)
    }

    /// Opens `sealed` into `out`; false if it does not authenticate (nothing usable in `out`).
    func open(
        _ sealed: UnsafeRawBufferPointer, tag: [UInt8], block: UInt64, version: UInt64,
        into out: UnsafeMutableRawBufferPointer
    ) -> Bool {
        guard let nonce = try? AES.GCM.Nonce(data: Self.nonceBytes(version: version)),
            let box = try? AES.GCM.SealedBox(nonce: nonce, ciphertext: sealed, tag: tag),
            let plain = try? AES.GCM.open(
                box, using: key, authenticating: associatedData(block: block, version: version)),
            plain.count == out.count
        else { return false }
        plain.copyBytes(to: out)
        return true
    }
}
