import Foundation

/// Your own kernel for `ringfence audit --target linux-guest` (`--kernel`, `--modules`,
/// `--modules-deb`, `--config`): scripts/guest/build-image.sh builds the guest around it.
public struct GuestKernelSource: Sendable, Equatable {
    /// A bzImage (nil: the one in `modulesDeb`).
    public var kernel: String?
    /// Its modules: `lib/modules/RELEASE`, a root holding it, or a folder of `.ko` files.
    public var modules: String?
    /// A linux-image `.deb` holding the modules (extracted, never installed).
    public var modulesDeb: String?
    /// The kernel's `.config` (default: `boot/config-RELEASE` next to the modules).
    public var config: String?

    public init(kernel: String? = nil, modules: String? = nil, modulesDeb: String? = nil, config: String? = nil) {
        self.kernel = kernel
        self.modules = modules
        self.modulesDeb = modulesDeb
        self.config = config
    }

    /// build-image.sh's options for this kernel.
    public var buildArguments: [String] {
        var a: [String] = []
        if let kernel { a += ["--kernel", kernel] }
        if let modules { a += ["--modules", modules] }
        if let modulesDeb { a += ["--modules-deb", modulesDeb] }
        if let config { a += ["--config", config] }
        return a
    }

    /// A folder name for the image built around it (one per kernel file name).
    public var imageName: String {
        let file = URL(fileURLWithPath: kernel ?? modulesDeb ?? "kernel").lastPathComponent
        return String(file.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" ? $0 : "_" })
    }
}

/// The kernel an audit ran against, as the report names it: `uname -r`, where it came
/// from, and the config flags that decide how it treats a device (build-image.sh's
/// `kernel.txt`).
public struct GuestKernel: Sendable, Codable, Equatable {
    /// The release the bzImage announces.
    public var release: String
    /// What the guest's `uname -r` said (nil: no guest got that far).
    public var booted: String?
    /// The package (and version) or file it came from.
    public var source: String
    public var sha256: String
    /// `CONFIG_...` → `y`, `m`, `n` or a value; empty when the config was not given.
    public var config: [String: String]

    public init(release: String, booted: String? = nil, source: String, sha256: String, config: [String: String]) {
        self.release = release
        self.booted = booted
        self.source = source
        self.sha256 = sha256
        self.config = config
    }

    /// Parses `kernel.txt` (`key=value` lines); nil without a release line.
    public init?(kernelTxt text: String) {
        var fields: [String: String] = [:]
        var config: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            guard let eq = line.firstIndex(of: "=") else { continue }
            let key = String(line[..<eq])
            let value = String(line[line.index(after: eq)...])
            if key.hasPrefix("CONFIG_") { config[key] = value } else { fields[key] = value }
        }
        guard let release = fields["release"], !release.isEmpty else { return nil }
        self.init(
            release: release, source: fields["source"] ?? "", sha256: fields["sha256"] ?? "", config: config)
    }

    /// The flags a reader of an audit looks for first, in this order (the rest are in the JSON).
    public static let keyFlags = [
        "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_PCI_LEGACY", "CONFIG_VIRTIO_HARDEN_NOTIFICATION",
        "CONFIG_SWIOTLB", "CONFIG_DMA_RESTRICTED_POOL", "CONFIG_AMD_MEM_ENCRYPT", "CONFIG_INTEL_TDX_GUEST",
        "CONFIG_HARDENED_USERCOPY", "CONFIG_FORTIFY_SOURCE", "CONFIG_INIT_ON_ALLOC_DEFAULT_ON",
        "CONFIG_INIT_ON_FREE_DEFAULT_ON", "CONFIG_BUG_ON_DATA_CORRUPTION", "CONFIG_DEBUG_LIST", "CONFIG_KASAN",
        "CONFIG_UBSAN", "CONFIG_PANIC_ON_OOPS",
    ]

    /// Two Markdown lines: the kernel, then its key flags.
    public var markdown: String {
        var first = "Kernel: `\(release)`"
        if let booted, booted != release { first += " (**booted as `\(booted)`**)" }
        if !source.isEmpty { first += ", from \(source)" }
        if !sha256.isEmpty { first += ", sha256 `\(sha256.prefix(16))`" }
        let flags = Self.keyFlags.compactMap { k in config[k].map { "\(k.dropFirst(7))=\($0)" } }
        let second =
            config.isEmpty
            ? "Config: unknown (give `--config`, or modules with `boot/config-\(release)`)."
            : "Config: " + flags.joined(separator: ", ") + " (all `CONFIG_VIRTIO*` in the JSON)."
        return first + ".\n" + second + "\n"
    }
}
