// swift-tools-version: 6.1
import PackageDescription

// Nested package (docs/design.md §9): keeps ordo-one/benchmark out of the root build.
// The trusting baseline driver lives here and only here (rule R8).
let package = Package(
    name: "RingFenceBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "RingFence", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
    ],
    targets: [
        // Thread pinning for the benchmark threads (the root's CRingFence is not a product).
        .target(name: "CBenchSupport", cSettings: [.define("_GNU_SOURCE")]),
        // The deliberately trusting baseline driver (R8: exists only here). A module of its
        // own, so both drivers are called across a module boundary, as the library is.
        .target(
            name: "TrustingRing",
            dependencies: [
                .product(name: "Virtqueue", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // The deliberately trusting virtio-blk driver (R8: exists only here): no bounce, no
        // validation, no deadlines; the same vhost-user Frontend control path.
        .target(
            name: "TrustingBlock",
            dependencies: [
                "TrustingRing",
                .product(name: "Virtqueue", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
                .product(name: "VhostUser", package: "RingFence"),
                .product(name: "VirtioBlock", package: "RingFence"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // 4 KiB randread against real back-ends, two contestants interleaved: hardened vs
        // trusting driver (issue 3), or our device vs qsd (issue 4). scripts/bench-blk.
        // The C busy-polling vhost-user-blk driver (R8: exists only here), the baseline of
        // the wait strategies (issue 19): `blk-ratio wait`, scripts/bench-wait.
        .target(name: "CBlkPoller", cSettings: [.define("_GNU_SOURCE")]),
        .executableTarget(
            name: "blk-ratio",
            dependencies: [
                "TrustingBlock",
                "CBlkPoller",
                .product(name: "VirtioBlock", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Sources/BlkRatio",
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // The deliberately trusting virtio-net transmitter (R8: exists only here).
        .target(
            name: "TrustingNet",
            dependencies: [
                "TrustingRing",
                .product(name: "Virtqueue", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
                .product(name: "VhostUser", package: "RingFence"),
                .product(name: "VirtioNet", package: "RingFence"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // Hardened VirtioNetDriver vs the trusting transmitter, interleaved (issue 15).
        .executableTarget(
            name: "net-ratio",
            dependencies: [
                "TrustingNet",
                .product(name: "VirtioNet", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
            ],
            path: "Sources/NetRatio",
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // The workloads shared by the benchmarks and ring-ratio.
        .target(
            name: "RingWorkload",
            dependencies: [
                "CBenchSupport",
                "TrustingRing",
                .product(name: "Virtqueue", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
                .product(name: "RingTestSupport", package: "RingFence"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // Interleaved hardened/trusting rounds in one process; prints the ratio.
        .executableTarget(
            name: "ring-ratio",
            dependencies: ["RingWorkload"],
            path: "Sources/RingRatio",
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // The deliberately trusting Xen blkif frontend in C, on libxen-dev's ring.h/blkif.h
        // macros (R8: exists only here; the root's Tests/CXenPeer is the tests' reference peer).
        .target(name: "CXenTrusting", cSettings: [.define("_GNU_SOURCE")]),
        // Hardened XenRing frontend vs the trusting C frontend, same backend process, same
        // run, 4 KiB requests (issue 6). docs/xen.md.
        .executableTarget(
            name: "xen-bench",
            dependencies: [
                "CXenTrusting",
                .product(name: "BlockBench", package: "RingFence"),
                .product(name: "XenRing", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
                .product(name: "RingTestSupport", package: "RingFence"),
            ],
            path: "Sources/XenBench",
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        // The deliberately trusting Xen netif frontend in C, on libxen-dev's ring.h/netif.h
        // macros (R8: exists only here; the root's Tests/CXenPeer/netpeer.c is the tests' peer).
        .target(name: "CXenNetTrusting", cSettings: [.define("_GNU_SOURCE")]),
        // Hardened XenRing netfront vs the trusting C netfront, same loopback netback
        // process, same run, 64 B and 1500 B frames (issue 17). docs/xen.md.
        .executableTarget(
            name: "xen-net-bench",
            dependencies: [
                "CXenNetTrusting",
                .product(name: "XenRing", package: "RingFence"),
                .product(name: "SharedMemory", package: "RingFence"),
            ],
            path: "Sources/XenNetBench",
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "RingBenchmarks",
            dependencies: [
                "RingWorkload",
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/RingBenchmarks",
            swiftSettings: [.swiftLanguageMode(.v6)],
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
