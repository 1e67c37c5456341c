// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

let package = Package(
    name: "RingFence",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "SharedMemory", targets: ["SharedMemory"]),
        .library(name: "Virtqueue", targets: ["Virtqueue"]),
        .library(name: "VhostUser", targets: ["VhostUser"]),
        .library(name: "BlockImage", targets: ["BlockImage"]),
        .library(name: "VirtioBlock", targets: ["VirtioBlock"]),
        .library(name: "VirtioNet", targets: ["VirtioNet"]),
        .library(name: "VirtioFS", targets: ["VirtioFS"]),
        .library(name: "RingTestSupport", targets: ["RingTestSupport"]),
        .library(name: "XenRing", targets: ["XenRing"]),
        .library(name: "Adversary", targets: ["Adversary"]),
        .library(name: "BlockBench", targets: ["BlockBench"]),
        .library(name: "VerifiedBlock", targets: ["VerifiedBlock"]),
        .library(name: "RingFenceResults", targets: ["RingFenceResults"]),
        .executable(name: "ringfence", targets: ["RingFenceCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        // `swift package generate-documentation` (scripts/docs): the DocC catalogs in CI.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        .target(
            name: "CRingFence",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        .target(
            name: "SharedMemory",
            dependencies: [
                "CRingFence",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "Virtqueue",
            dependencies: [
                "SharedMemory",
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "VhostUser",
            dependencies: ["SharedMemory", "Virtqueue"],
            swiftSettings: strict
        ),
        // The file-backed disk both device sides serve (virtio-blk and Xen blkif): a module
        // of its own so XenRing does not depend on VirtioBlock or VhostUser.
        .target(
            name: "BlockImage",
            dependencies: ["SharedMemory", "CRingFence"],
            swiftSettings: strict
        ),
        .target(
            name: "VirtioBlock",
            dependencies: ["SharedMemory", "Virtqueue", "VhostUser", "BlockImage", "CRingFence"],
            swiftSettings: strict
        ),
        // virtio-fs: FUSE wire format, the driver (Driver/) and the device over a host
        // directory (Device/).
        .target(
            name: "VirtioFS",
            dependencies: ["SharedMemory", "Virtqueue", "VhostUser", "CRingFence"],
            swiftSettings: strict
        ),
        .target(
            name: "VirtioNet",
            dependencies: ["SharedMemory", "Virtqueue", "VhostUser"],
            swiftSettings: strict
        ),
        // Test support: in-process ring pairs, a misbehaving vhost-user-blk back-end, test
        // threads, the two-process ring (also the `ringfence ring` demo). Not for production.
        .target(
            name: "RingTestSupport",
            dependencies: ["SharedMemory", "Virtqueue", "CRingFence", "VhostUser", "BlockImage", "VirtioBlock"],
            swiftSettings: strict
        ),
        .target(
            name: "Adversary",
            dependencies: [
                "SharedMemory", "Virtqueue", "VhostUser", "BlockImage", "VirtioBlock", "XenRing", "VerifiedBlock",
                "VirtioFS", "VirtioNet",
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "RingFenceCLI",
            dependencies: [
                "Adversary",
                "BlockBench",
                "BlockImage",
                "RingFenceResults",
                "SharedMemory",
                "Virtqueue",
                "RingTestSupport",
                "VhostUser",
                "VirtioBlock",
                "VerifiedBlock",
                "VirtioFS",
                "VirtioNet",
                "XenRing",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            swiftSettings: strict
        ),
        // What `ringfence ... --json` prints: Codable types tools (and the tests) decode.
        .target(name: "RingFenceResults", swiftSettings: strict),
        .target(
            name: "XenRing",
            dependencies: [
                "SharedMemory",
                "BlockImage",
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: strict
        ),
        // The benchmark loop both block transports run (blk bench, xen-blk bench, xen-bench).
        // Above both transports, so neither carries benchmark code.
        .target(
            name: "BlockBench",
            dependencies: [
                "SharedMemory", "VirtioBlock", "XenRing", "RingFenceResults",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            swiftSettings: strict
        ),
        // A block layer that trusts no byte the back-end returns (AEAD, versions, Merkle root
        // in a local anchor; verity mode): above both transports, as BlockBench.
        .target(
            name: "VerifiedBlock",
            dependencies: [
                "SharedMemory", "VirtioBlock", "XenRing",
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VerifiedBlockTests",
            dependencies: ["VerifiedBlock", "SharedMemory", "VirtioBlock", "XenRing", "BlockImage"],
            swiftSettings: strict
        ),
        // Reference peer on Debian libxen-dev's ring.h/blkif.h macros, for the compatibility
        // tests only. The trusting benchmark baseline lives in Benchmarks/ (R8).
        .target(
            name: "CXenPeer",
            path: "Tests/CXenPeer",
            cSettings: [.define("_GNU_SOURCE")]
        ),
        .testTarget(
            name: "XenRingTests",
            dependencies: [
                "XenRing", "BlockImage", "SharedMemory", "CXenPeer", "RingTestSupport", "Adversary",
                "BlockBench", "RingFenceResults",
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "SharedMemoryTests",
            dependencies: ["SharedMemory", "CRingFence", "RingTestSupport"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VirtqueueTests",
            dependencies: [
                "Virtqueue", "SharedMemory", "RingTestSupport",
                .product(name: "PropertyBased", package: "swift-property-based"),
                .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VirtioBlockDriverTests",
            dependencies: ["VirtioBlock", "VhostUser", "Virtqueue", "SharedMemory", "RingTestSupport"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VirtioBlockDeviceTests",
            dependencies: [
                "BlockImage", "VirtioBlock", "VhostUser", "Virtqueue", "SharedMemory", "CRingFence", "RingTestSupport",
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VirtioNetDriverTests",
            dependencies: ["VirtioNet", "VhostUser", "Virtqueue", "SharedMemory", "RingTestSupport"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VirtioNetDeviceTests",
            dependencies: ["VirtioNet", "VhostUser", "Virtqueue", "SharedMemory", "RingTestSupport"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "AdversaryTests",
            dependencies: [
                "Adversary", "BlockImage", "VirtioBlock", "VhostUser", "Virtqueue", "SharedMemory", "VirtioFS",
                "VirtioNet",
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VirtioFSDriverTests",
            dependencies: ["VirtioFS", "VhostUser", "Virtqueue", "SharedMemory"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "VirtioFSDeviceTests",
            dependencies: ["VirtioFS", "VhostUser", "Virtqueue", "SharedMemory"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "InteropTests",
            dependencies: [
                "VirtioBlock", "VirtioFS", "VirtioNet", "VhostUser", "Virtqueue", "SharedMemory", "BlockBench",
                "RingFenceResults", "RingTestSupport",
            ],
            swiftSettings: strict
        ),
    ]
)
