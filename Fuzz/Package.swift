// swift-tools-version: 6.1
// libFuzzer targets over every parser of foreign data. Built by scripts/fuzz with
// `swift build --sanitize fuzzer --sanitize address`; a nested package so the root build
// stays fast.
import PackageDescription

let settings: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
]

func fuzzTarget(_ name: String) -> Target {
    .executableTarget(
        name: name,
        dependencies: [
            "FuzzSupport",
            "SharedMemory", "Virtqueue", "RingHarness", "VhostUser", "VirtioBlock", "CRingFence", "XenRing",
        ],
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
        .target(
            name: "VirtioBlock", dependencies: ["SharedMemory", "Virtqueue", "VhostUser", "CRingFence"],
            swiftSettings: settings),
        .target(
            name: "XenRing",
            dependencies: ["SharedMemory", "Virtqueue", .product(name: "Atomics", package: "swift-atomics")],
            swiftSettings: settings),
        .target(
            name: "RingHarness",
            dependencies: ["SharedMemory", "Virtqueue", "CRingFence", "VhostUser", "VirtioBlock"],
            swiftSettings: settings),
        .target(
            name: "FuzzSupport",
            dependencies: ["SharedMemory", "Virtqueue", "XenRing"],
            swiftSettings: settings),
        fuzzTarget("FuzzUsedRing"),
        fuzzTarget("FuzzDeviceChain"),
        fuzzTarget("FuzzGuestMemory"),
        fuzzTarget("FuzzVhostMessage"),
        fuzzTarget("FuzzBlockRequests"),
        fuzzTarget("FuzzBackendMessages"),
        fuzzTarget("FuzzXenResponses"),
        fuzzTarget("FuzzXenRequests"),
        fuzzTarget("FuzzPackedDriver"),
        fuzzTarget("FuzzPackedDevice"),
    ]
)
