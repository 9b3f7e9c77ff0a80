// swift-tools-version:6.1
//
// AccelGate: a gRPC gateway that lets many tenants share compression and
// crypto accelerators through zero-copy shared-memory rings.
//
// Dependency direction (see docs/ARCHITECTURE.md):
//   accelgate/accelctl → AccelService → AccelDispatcher → AccelScheduler (pure)
//                                                     ↘ AccelDriver → AccelABI → CAccelABI, CAccelSys
//   AccelDevice → AccelABI, CAccelSys, CAccelEngines
import PackageDescription

/// One set of strict settings for every Swift target.
let strictSettings: [SwiftSetting] = [
  .swiftLanguageMode(.v6),
  .enableUpcomingFeature("ExistentialAny"),
  .enableUpcomingFeature("InternalImportsByDefault"),
  .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
  name: "AccelGate",
  platforms: [.macOS(.v15)],
  products: [
    .executable(name: "accelgate", targets: ["accelgate"]),
    .executable(name: "accelctl", targets: ["accelctl"]),
    .executable(name: "accelbench", targets: ["accelbench"]),
    /// Client library for the local lane (shared memory with a co-located gateway).
    .library(name: "AccelGateLocal", targets: ["AccelGateLocal"]),
  ],
  dependencies: [
    .package(url: "https://github.com/grpc/grpc-swift-2.git", exact: "2.4.3"),
    .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", exact: "2.9.2"),
    .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1"),
    .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
    // Already in the graph through grpc-swift-nio-transport; named for AccelHTTP2's workaround.
    .package(url: "https://github.com/apple/swift-nio-http2.git", exact: "1.46.0"),
    .package(url: "https://github.com/apple/swift-argument-parser.git", exact: "1.8.2"),
    .package(url: "https://github.com/apple/swift-log.git", exact: "1.16.2"),
    .package(url: "https://github.com/jpsim/Yams.git", exact: "6.2.2"),
    .package(url: "https://github.com/swift-server/swift-prometheus.git", exact: "2.4.1"),
    .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", exact: "0.2.0"),
    // Already in the graph through the gRPC transport; named here for the /metrics HTTP server.
    .package(url: "https://github.com/apple/swift-nio.git", exact: "2.101.3"),
    // Indirect dependencies, pinned too: with no Package.resolved committed, the image
    // build would otherwise resolve the newest versions the pins above allow, not what
    // CI built. `make check-pins` fails when the resolved graph and these disagree.
    .package(url: "https://github.com/apple/swift-algorithms.git", exact: "1.2.1"),
    .package(url: "https://github.com/apple/swift-asn1.git", exact: "1.7.4"),
    .package(url: "https://github.com/apple/swift-async-algorithms.git", exact: "1.1.4"),
    .package(url: "https://github.com/apple/swift-atomics.git", exact: "1.3.0"),
    .package(url: "https://github.com/apple/swift-certificates.git", exact: "1.21.1"),
    .package(url: "https://github.com/apple/swift-collections.git", exact: "1.6.0"),
    .package(url: "https://github.com/apple/swift-crypto.git", exact: "4.5.2"),
    .package(url: "https://github.com/apple/swift-http-structured-headers.git", exact: "1.7.0"),
    .package(url: "https://github.com/apple/swift-http-types.git", exact: "1.8.0"),
    .package(url: "https://github.com/apple/swift-metrics.git", exact: "2.13.0"),
    .package(url: "https://github.com/apple/swift-nio-extras.git", exact: "1.35.2"),
    .package(url: "https://github.com/apple/swift-nio-ssl.git", exact: "2.37.6"),
    .package(url: "https://github.com/apple/swift-nio-transport-services.git", exact: "1.28.0"),
    .package(url: "https://github.com/apple/swift-numerics", exact: "1.1.1"),
    .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", exact: "2.13.0"),
    .package(url: "https://github.com/apple/swift-system.git", exact: "1.8.1"),
  ],
  targets: [
    // MARK: C layers

    /// The device ABI as a C header: region layout, SQE/CQE, opcodes, status codes.
    .target(name: "CAccelABI"),
    /// Linux shims Swift cannot reach directly: memfd, futex, fences, atomics on shared memory.
    .target(name: "CAccelSys", dependencies: ["CAccelABI"]),
    /// Software engines over raw pointers: ISA-L igzip, libdeflate, zlib, zstd, LZ4, OpenSSL.
    .target(
      name: "CAccelEngines",
      dependencies: ["CAccelABI"],
      cSettings: [.unsafeFlags(["-O2"])],
      linkerSettings: [
        .linkedLibrary("isal"), .linkedLibrary("deflate"), .linkedLibrary("z"), .linkedLibrary("zstd"),
        .linkedLibrary("lz4"), .linkedLibrary("crypto"),
      ]
    ),

    /// A small C face over gRPC's C core server API (libgrpc): calls, batches, slices, metadata.
    .target(name: "CAccelGRPC", linkerSettings: [.linkedLibrary("grpc"), .linkedLibrary("gpr")]),

    /// OpenSSL primitives for the gateway: key hashing, randomness, secure zeroing.
    .target(name: "CAccelCrypto", linkerSettings: [.linkedLibrary("crypto")]),

    // MARK: Swift modules

    .target(name: "AccelABI", dependencies: ["CAccelABI", "CAccelSys"], swiftSettings: strictSettings),
    .target(
      name: "AccelDevice",
      dependencies: ["AccelABI", "CAccelSys", "CAccelEngines", .product(name: "Logging", package: "swift-log")],
      swiftSettings: strictSettings
    ),
    .target(
      name: "AccelDriver",
      dependencies: ["AccelABI", "CAccelSys", .product(name: "Logging", package: "swift-log")],
      swiftSettings: strictSettings
    ),
    .target(name: "AccelScheduler", swiftSettings: strictSettings),
    .target(
      name: "AccelDispatcher",
      dependencies: ["AccelScheduler", "AccelDriver", "AccelABI", .product(name: "Logging", package: "swift-log")],
      swiftSettings: strictSettings
    ),
    /// The API's protobuf messages (generated; SwiftProtobuf only, no gRPC).
    .target(
      name: "AccelMessages",
      dependencies: [.product(name: "SwiftProtobuf", package: "swift-protobuf")],
      swiftSettings: strictSettings
    ),
    /// The API's gRPC service stubs (generated) over AccelMessages.
    .target(
      name: "AccelProto",
      dependencies: [
        "AccelMessages",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
      ],
      swiftSettings: strictSettings
    ),
    /// Requests become jobs: validation, limits, keys and envelopes, and job
    /// results become responses. No transport: it does not link gRPC.
    .target(
      name: "AccelRequests",
      dependencies: [
        "AccelMessages", "AccelDispatcher", "AccelDriver", "AccelABI", "CAccelCrypto",
        .product(name: "Yams", package: "Yams"),
      ],
      swiftSettings: strictSettings
    ),
    /// The network edge on gRPC's C core: completion-queue threads, calls answered from any thread.
    .target(name: "AccelCoreEdge", dependencies: ["CAccelGRPC"], swiftSettings: strictSettings),
    .target(
      name: "AccelService",
      dependencies: [
        "AccelMessages", "AccelRequests", "AccelCoreEdge", "AccelDispatcher", "AccelDevice", "AccelDriver",
        "AccelABI", "AccelScheduler", "CAccelCrypto",
        .product(name: "Yams", package: "Yams"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "Prometheus", package: "swift-prometheus"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOPosix", package: "swift-nio"),
        .product(name: "NIOHTTP1", package: "swift-nio"),
      ],
      swiftSettings: strictSettings
    ),
    .executableTarget(
      name: "accelgate",
      dependencies: ["AccelService", "CAccelSys", .product(name: "ArgumentParser", package: "swift-argument-parser")],
      swiftSettings: strictSettings
    ),
    .target(
      name: "AccelHTTP2",
      dependencies: [
        .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOHTTP2", package: "swift-nio-http2"),
      ],
      swiftSettings: strictSettings
    ),
    .target(
      name: "AccelGateLocal",
      dependencies: ["AccelMessages", "AccelABI", "CAccelSys", .product(name: "SwiftProtobuf", package: "swift-protobuf")],
      swiftSettings: strictSettings
    ),
    .executableTarget(
      name: "accelctl",
      dependencies: [
        "AccelProto",
        "AccelMessages",
        "AccelGateLocal",
        "AccelHTTP2",
        .product(name: "Histogram", package: "hdrhistogram-swift"),
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ],
      swiftSettings: strictSettings
    ),
    .executableTarget(
      name: "accelbench",
      dependencies: [
        "AccelService", "AccelDevice", "AccelDriver", "AccelDispatcher", "AccelProto", "AccelMessages", "CAccelEngines",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ],
      path: "Benchmarks/accelbench",
      swiftSettings: strictSettings
    ),

    // Ring-level fuzz games on the real shared memory (fuzz/ring/main.swift; run by fuzz/ring/run.sh).
    .executableTarget(
      name: "accelringfuzz",
      dependencies: ["AccelDevice", "AccelDriver", "AccelABI", "CAccelABI"],
      path: "fuzz/ring",
      exclude: ["run.sh"],
      swiftSettings: strictSettings
    ),

    // MARK: Tests

    .testTarget(name: "AccelABITests", dependencies: ["AccelABI", "CAccelSys"], swiftSettings: strictSettings),
    .testTarget(
      name: "AccelDeviceTests",
      dependencies: ["AccelDevice", "AccelDriver", "AccelABI", "CAccelEngines", "CAccelSys"],
      swiftSettings: strictSettings
    ),
    .testTarget(name: "AccelDriverTests", dependencies: ["AccelDriver", "AccelABI"], swiftSettings: strictSettings),
    .testTarget(
      name: "AccelDispatcherTests",
      dependencies: ["AccelDispatcher", "AccelDevice", "AccelDriver", "AccelABI", "AccelScheduler"],
      swiftSettings: strictSettings
    ),
    .testTarget(name: "AccelSchedulerTests", dependencies: ["AccelScheduler"], swiftSettings: strictSettings),
    .testTarget(
      name: "AccelRequestsTests",
      dependencies: [
        "AccelRequests", "AccelMessages", "AccelDispatcher", "AccelDriver", "AccelABI",
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
      ],
      swiftSettings: strictSettings
    ),
    .testTarget(
      name: "AccelServiceTests",
      dependencies: [
        "AccelService", "AccelProto", "AccelMessages", "AccelRequests", "AccelDevice", "AccelScheduler", "AccelDispatcher", "AccelDriver", "AccelABI", "AccelCoreEdge",
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
      ],
      swiftSettings: strictSettings
    ),
  ]
)
