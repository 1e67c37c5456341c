// swift-tools-version: 6.1
// libFuzzer targets over every parser of foreign data. Built by scripts/fuzz (ASan and
// libFuzzer, `-sanitize=fuzzer,address`); a nested package so the root build
// stays fast.
import PackageDescription

let settings: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

/// A target links only the modules it exercises: libFuzzer walks every coverage counter
/// of the binary after each input, so unused modules would only slow it down.
func fuzzTarget(_ name: String, _ uses: [Target.Dependency]) -> Target {
    .executableTarget(
        name: name, dependencies: ["FuzzSupport"] + uses,
        swiftSettings: settings + [.unsafeFlags(["-parse-as-library"])])
}

let package = Package(
    name: "RingFenceFuzz",
    // The library modules are symlinks to ../Sources: SwiftPM instruments only the root
    // package's own targets, so the code under test must be built as part of this one.
    dependencies: [
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
    ],
    targets: [
        .target(name: "CRingFence", cSettings: [.define("_GNU_SOURCE")]),
        .target(
            name: "SharedMemory",
            dependencies: [
                "CRingFence",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: settings),
        .target(
            name: "Virtqueue",
            dependencies: ["SharedMemory", .product(name: "Atomics", package: "swift-atomics")],
            swiftSettings: settings),
        .target(name: "VhostUser", dependencies: ["SharedMemory", "Virtqueue", "CRingFence"], swiftSettings: settings),
        .target(name: "BlockImage", dependencies: ["SharedMemory", "CRingFence"], swiftSettings: settings),
        .target(
            name: "VirtioBlock", dependencies: ["SharedMemory", "Virtqueue", "VhostUser", "BlockImage", "CRingFence"],
            swiftSettings: settings),
        .target(
            name: "XenRing",
            dependencies: [
                "SharedMemory", "BlockImage", .product(name: "Atomics", package: "swift-atomics"),
            ],
            swiftSettings: settings),
        .target(
            name: "RingTestSupport",
            dependencies: ["SharedMemory", "Virtqueue", "CRingFence", "VhostUser", "BlockImage", "VirtioBlock"],
            swiftSettings: settings),
        .target(
            name: "VirtioFS", dependencies: ["SharedMemory", "Virtqueue", "VhostUser", "CRingFence"],
            swiftSettings: settings),
        .target(name: "FuzzSupport", swiftSettings: settings),
        .target(name: "FuzzXenSupport", dependencies: ["SharedMemory", "XenRing"], swiftSettings: settings),
        fuzzTarget("FuzzUsedRing", ["RingTestSupport", "Virtqueue"]),
        fuzzTarget("FuzzDeviceChain", ["RingTestSupport", "SharedMemory", "Virtqueue"]),
        fuzzTarget("FuzzGuestMemory", ["SharedMemory"]),
        fuzzTarget("FuzzVhostMessage", ["SharedMemory", "VhostUser"]),
        fuzzTarget(
            "FuzzBlockRequests",
            ["BlockImage", "RingTestSupport", "SharedMemory", "VirtioBlock", "VhostUser", "Virtqueue"]),
        fuzzTarget("FuzzBackendMessages", ["BlockImage", "CRingFence", "SharedMemory", "VirtioBlock", "VhostUser"]),
        fuzzTarget("FuzzXenResponses", ["FuzzXenSupport", "SharedMemory", "Virtqueue", "XenRing"]),
        fuzzTarget("FuzzXenRequests", ["FuzzXenSupport", "SharedMemory", "Virtqueue", "XenRing"]),
        fuzzTarget("FuzzNetResponses", ["FuzzXenSupport", "SharedMemory", "XenRing"]),
        fuzzTarget("FuzzNetRequests", ["FuzzXenSupport", "SharedMemory", "XenRing"]),
        fuzzTarget("FuzzPackedDriver", ["RingTestSupport", "SharedMemory", "Virtqueue"]),
        fuzzTarget("FuzzPackedDevice", ["RingTestSupport", "SharedMemory", "Virtqueue"]),
        fuzzTarget("FuzzFuseReplies", ["VirtioFS"]),
        fuzzTarget(
            "FuzzFSRequests", ["CRingFence", "RingTestSupport", "SharedMemory", "VhostUser", "VirtioFS", "Virtqueue"]),
    ]
)
