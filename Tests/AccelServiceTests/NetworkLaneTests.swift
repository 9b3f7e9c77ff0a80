import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelProto
import AccelCoreEdge
import AccelMessages
@testable import AccelService
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Synchronization
import Testing

/// The protobuf wire scanner the network lane relies on.
@Suite struct ProtoWireTests {
  static func scan(_ bytes: [UInt8]) -> [ProtoWire.Field]? { bytes.withUnsafeBytes { ProtoWire.scan($0) } }

  @Test func scansWhatSwiftProtobufWrites() throws {
    let m = Accelgate_V1_EncryptRequest.with {
      $0.algorithm = .aes256Gcm
      $0.key = .with { $0.raw = Data(repeating: 7, count: 32) }
      $0.nonce = Data(repeating: 1, count: 12)
      $0.aad = Data("header".utf8)
      $0.plaintext = Data((0..<300).map { UInt8($0 & 0xFF) })
      $0.compress = .with { $0.format = .gzip; $0.level = 1 }
      $0.inputRegion = .with { $0.region = "r"; $0.offset = 1 << 40; $0.length = 9 }
    }
    let bytes: [UInt8] = try m.serializedBytes()
    let fields = try #require(Self.scan(bytes))
    #expect(fields.map(\.number) == [1, 2, 3, 4, 5, 6, 15])
    #expect(fields.map(\.wireType) == [0, 2, 2, 2, 2, 2, 2])
    // The fields tile the message exactly.
    #expect(fields.first?.range.lowerBound == 0 && fields.last?.range.upperBound == bytes.count)
    for (a, b) in zip(fields, fields.dropFirst()) { #expect(a.range.upperBound == b.range.lowerBound) }
    let payload = try #require(fields.first { $0.number == 5 })
    #expect(Array(bytes[payload.value]) == Array(m.plaintext))
  }

  @Test func fixedSizeAndVarintFieldsAreSkippedWhole() throws {
    // field 1 varint 300, field 2 fixed64, field 3 fixed32, field 4 empty bytes.
    let bytes: [UInt8] = [0x08, 0xAC, 0x02, 0x11] + Array(repeating: 0xEE, count: 8) + [0x1D, 1, 2, 3, 4, 0x22, 0x00]
    let fields = try #require(Self.scan(bytes))
    #expect(fields.map(\.number) == [1, 2, 3, 4])
    #expect(fields.map(\.value.count) == [2, 8, 4, 0])
  }

  @Test(arguments: [
    ([0x08] as [UInt8], "truncated varint value"),
    ([0x1A, 0x05, 1, 2], "length past the end"),
    ([0x1A], "missing length"),
    ([0x1A, 0xFF], "truncated length"),
    ([0x00, 0x01], "field number 0"),
    ([0x0B, 0x0C], "group start (wire type 3)"),
    ([0x0C], "group end (wire type 4)"),
    ([0x0E, 0x00], "wire type 6"),
    ([0x0F, 0x00], "wire type 7"),
    ([0x09, 1, 2, 3], "truncated fixed64"),
    ([0x0D, 1, 2], "truncated fixed32"),
    ([0x08] + Array(repeating: 0xFF, count: 10) + [0x01], "varint over 10 bytes"),
    ([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x00], "tag over 32 bits"),
    ([0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], "huge length"),
  ])
  func malformedFramingIsRefused(bytes: [UInt8], why: String) {
    #expect(Self.scan(bytes) == nil, "\(why)")
  }

  @Test func randomBytesNeverCrashAndTileWhenAccepted() async {
    var rng = SystemRandomNumberGenerator()
    for round in 0..<6000 {
      if round % 500 == 0 { await Task.yield() }  // leave the cooperative pool to timing-sensitive suites
      let n = Int.random(in: 0..<48, using: &rng)
      let bytes = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
      guard let fields = Self.scan(bytes) else { continue }
      var at = 0
      for f in fields {
        #expect(f.range.lowerBound == at && f.value.upperBound == f.range.upperBound && f.number > 0)
        at = f.range.upperBound
      }
      #expect(at == n)
    }
  }

  @Test func varintsRoundTrip() {
    let values: [UInt64] = [0, 1, 127, 128, 300, 16383, 16384, 1 << 21, 1 << 28, 1 << 35, 1 << 56, 1 << 63, .max]
    for v in values {
      var out = [UInt8](repeating: 0, count: 10)
      var i = 0
      out.withUnsafeMutableBytes { ProtoWire.writeVarint(v, into: $0, at: &i) }
      #expect(i == ProtoWire.varintSize(v))
      var j = 0
      let back = out.withUnsafeBytes { ProtoWire.varint($0, at: &j) }
      #expect(back == v && j == i)
    }
  }

  @Test func payloadFieldNumbersMatchTheProto() throws {
    let one = Data([7])
    func tag(_ m: some SwiftProtobuf.Message) throws -> UInt8 { (try m.serializedBytes() as [UInt8])[0] }
    #expect(try tag(Accelgate_V1_CompressRequest.with { $0.data = one }) == UInt8(NetworkLane.compressData << 3 | 2))
    #expect(try tag(Accelgate_V1_DecompressRequest.with { $0.data = one }) == UInt8(NetworkLane.decompressData << 3 | 2))
    #expect(try tag(Accelgate_V1_EncryptRequest.with { $0.plaintext = one }) == UInt8(NetworkLane.encryptPlaintext << 3 | 2))
    #expect(try tag(Accelgate_V1_DecryptRequest.with { $0.ciphertext = one }) == UInt8(NetworkLane.decryptCiphertext << 3 | 2))
    let field1 = UInt8(NetworkLane.responsePayload << 3 | 2)
    #expect(try tag(Accelgate_V1_CompressResponse.with { $0.data = one }) == field1)
    #expect(try tag(Accelgate_V1_DecompressResponse.with { $0.data = one }) == field1)
    #expect(try tag(Accelgate_V1_EncryptResponse.with { $0.ciphertext = one }) == field1)
    #expect(try tag(Accelgate_V1_DecryptResponse.with { $0.plaintext = one }) == field1)
  }
}

/// The network lane's decoding and the edge's answers from the pool, against a real dispatcher and device.
@Suite(.serialized, .timeLimit(.minutes(2))) struct NetworkLaneCodecTests {
  final class Rig: @unchecked Sendable {
    let device: EmulatedDevice
    let driver: DeviceDriver
    let dispatcher: Dispatcher
    let metrics = GatewayMetrics()
    var lane: NetworkLane { NetworkLane(dispatcher: dispatcher, metrics: metrics) }

    init(zone: UInt64 = 2 << 20) throws {
      device = try EmulatedDevice(
        configuration: .defaults {
          $0.queueCount = 2
          $0.engineCount = 1
          $0.dataPoolBytes = 4 << 20
          $0.idleSpin = .microseconds(10)
        })
      device.start()
      driver = try DeviceDriver(queueFileDescriptors: [device.exportQueue(0), device.exportQueue(1)])
      var c = DispatcherConfiguration.defaults
      c.stagingZoneBytes = zone
      c.largestJobBytes = 1 << 20
      dispatcher = Dispatcher(driver: driver, configuration: c)
      dispatcher.start()
    }

    func stop() {
      dispatcher.shutdown()
      driver.stop()
      device.stop()
    }

    func decode<M: SwiftProtobuf.Message & Sendable>(
      _ bytes: [UInt8], as: M.Type, field: UInt32, tenant: String = "t", maxPayload: Int = 1 << 20
    ) throws -> LaneRequest<M> {
      try decode(bytes, cuts: [], as: M.self, field: field, tenant: tenant, maxPayload: maxPayload)
    }

    /// The same, with the message in slices cut at `cuts` (as the C core may hold it).
    func decode<M: SwiftProtobuf.Message & Sendable>(
      _ bytes: [UInt8], cuts: [Int], as: M.Type, field: UInt32, tenant: String = "t", maxPayload: Int = 1 << 20
    ) throws -> LaneRequest<M> {
      try bytes.withUnsafeBytes { whole in
        let bounds = [0] + cuts.filter { $0 > 0 && $0 < whole.count }.sorted() + [whole.count]
        let slices = zip(bounds, bounds.dropFirst()).map { UnsafeRawBufferPointer(rebasing: whole[$0..<$1]) }
        return try lane.decode(
          SlicedBytes(slices), whole: { whole }, field: field, maxPayload: maxPayload, sensitive: false,
          carriesKey: false, tenant: tenant)
      }
    }

    var isIdle: Bool {
      driver.queues.allSatisfy { $0.poolFreeBytes == $0.poolCapacity && $0.leasedCount == 0 }
        && dispatcher.stagedBytesByTenant.isEmpty
    }
  }

  /// Bytes by whole chunks (cheap in a debug build).
  static func payload(_ n: Int) -> Data {
    let chunk = Data((0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
    var out = Data(capacity: n)
    var i = 0
    while out.count < n {
      out.append(chunk.prefix(n - out.count))
      out.append(UInt8(truncatingIfNeeded: i))
      i += 1
    }
    return out.prefix(n)
  }

  /// The message as the lane hands it over, with the staged payload put back.
  static func rebuilt(_ r: LaneRequest<Accelgate_V1_CompressRequest>) -> Accelgate_V1_CompressRequest {
    var m = r.message
    if let s = r.staged { m.data = Data(UnsafeRawBufferPointer(s.buffer)) }
    return m
  }

  /// A Compress request with a payload of `payloadBytes`, an output region,
  /// and an unknown field (number 99, varint) that SwiftProtobuf keeps.
  static func compressRequest(_ format: Accelgate_V1_CompressionFormat, level: Int32, payloadBytes: Int) throws -> [UInt8] {
    let full = Accelgate_V1_CompressRequest.with {
      $0.format = format
      $0.level = level
      $0.data = Self.payload(payloadBytes)
      $0.outputRegion = .with { $0.region = "out"; $0.length = 5 }
    }
    return try full.serializedBytes() + [0x98, 0x06, 0x2A]
  }

  @Test func stagesThePayloadAndDecodesTheRestLikeSwiftProtobuf() throws {
    let rig = try Rig()
    defer { rig.stop() }
    let bytes = try Self.compressRequest(.gzip, level: 3, payloadBytes: 100_000)
    let expected = try Accelgate_V1_CompressRequest(serializedBytes: bytes)
    do {
      let r = try rig.decode(bytes, as: Accelgate_V1_CompressRequest.self, field: 3)
      let staged = try #require(r.staged)
      #expect(r.message.data.isEmpty, "the payload is not decoded into Data")
      #expect(staged.length == 100_000 && staged.isStaged)
      #expect(Self.rebuilt(r) == expected)
      #expect(r.message.unknownFields.data == expected.unknownFields.data && !expected.unknownFields.data.isEmpty)
      #expect(rig.dispatcher.stagedBytes(tenant: "t") > 0)
    }
    #expect(rig.isIdle, "an unused staged payload is freed with its last reference")
  }

  /// Issue 17, finding 21: a Decrypt's payload (ciphertext) is not secret, but
  /// its other fields carry the raw key; their copy is zeroed after decoding.
  @Test func theCopyHoldingADecryptKeyIsZeroed() throws {
    let rig = try Rig()
    defer { rig.stop() }
    let key = Data((0..<32).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 0xA5) })
    let bytes: [UInt8] = try Accelgate_V1_DecryptRequest.with {
      $0.algorithm = .aes256Gcm
      $0.key = .with { $0.raw = key }
      $0.nonce = Data(count: 12)
      $0.ciphertext = Self.payload(4096)
    }.serializedBytes()
    let wiped = Mutex<[[UInt8]]>([])
    func decode(carriesKey: Bool) throws -> LaneRequest<Accelgate_V1_DecryptRequest> {
      try bytes.withUnsafeBytes { whole in
        try rig.lane.decode(
          SlicedBytes(whole), whole: { whole }, field: NetworkLane.decryptCiphertext, maxPayload: 1 << 20,
          sensitive: false, carriesKey: carriesKey, tenant: "t"
        ) { (buffer: UnsafeMutableRawBufferPointer) in
          wiped.withLock { $0.append(Array(buffer)) }
          buffer.initializeMemory(as: UInt8.self, repeating: 0)
        }
      }
    }
    let r = try decode(carriesKey: true)
    #expect(r.staged != nil && r.message.key.raw == key)
    let seen = try #require(wiped.withLock { $0.first })
    #expect(seen.count > key.count)
    #expect(Data(seen).range(of: key) != nil, "the wiped copy is the one that held the key")
    _ = try decode(carriesKey: false)
    #expect(wiped.withLock { $0.count } == 1, "without a key nothing needs wiping")
  }

  /// The C core holds a large message in several slices: the field is found
  /// and copied across them, with the same outcome as from one buffer.
  @Test func aMessageInSlicesDecodesAsInOneBuffer() throws {
    let rig = try Rig()
    defer { rig.stop() }
    let bytes = try Self.compressRequest(.zstd, level: 5, payloadBytes: 70_000)
    var rng = SystemRandomNumberGenerator()
    // Cuts inside the tag and the length, at the payload's edges, and at random.
    var cutSets: [[Int]] = [[1], [2], [3], [4], [5], Array(stride(from: 7, to: bytes.count, by: 8192)), [bytes.count - 1]]
    for _ in 0..<40 { cutSets.append((0..<Int.random(in: 1...30, using: &rng)).map { _ in Int.random(in: 1..<bytes.count, using: &rng) }) }
    for cuts in cutSets {
      let r = try rig.decode(bytes, cuts: cuts, as: Accelgate_V1_CompressRequest.self, field: 3)
      let staged = try #require(r.staged, "cuts \(cuts)")
      #expect(staged.length == 70_000)
      #expect(Self.rebuilt(r) == (try Accelgate_V1_CompressRequest(serializedBytes: bytes)), "cuts \(cuts)")
    }
    // Truncated inside a slice boundary: refused as SwiftProtobuf refuses it.
    let cut = Array(bytes.prefix(bytes.count - 70_010))
    #expect(throws: (any Error).self) { try rig.decode(cut, cuts: [3, 4], as: Accelgate_V1_CompressRequest.self, field: 3) }
    #expect(rig.isIdle)
  }

  @Test func theLastPayloadFieldWinsAsInProtobuf() throws {
    let rig = try Rig()
    defer { rig.stop() }
    let a = Data(repeating: 0xAA, count: 5000)
    let b = Self.payload(7000)
    let bytes: [UInt8] =
      try Accelgate_V1_CompressRequest.with { $0.data = a }.serializedBytes()
      + Accelgate_V1_CompressRequest.with { $0.format = .zlib }.serializedBytes()
      + Accelgate_V1_CompressRequest.with { $0.data = b; $0.level = 2 }.serializedBytes()
    let expected = try Accelgate_V1_CompressRequest(serializedBytes: bytes)
    #expect(expected.data == b)
    let r = try rig.decode(bytes, as: Accelgate_V1_CompressRequest.self, field: 3)
    #expect(r.staged?.length == b.count)
    #expect(Self.rebuilt(r) == expected)
  }

  @Test func nothingToStageDecodesTheOrdinaryWay() throws {
    let rig = try Rig()
    defer { rig.stop() }
    for m in [
      Accelgate_V1_CompressRequest.with { $0.format = .gzip },  // no payload
      Accelgate_V1_CompressRequest(),  // empty message
    ] {
      let r = try rig.decode(try m.serializedBytes(), as: Accelgate_V1_CompressRequest.self, field: 3)
      #expect(r.staged == nil && r.message == m)
    }
    // The payload's field number with another wire type: SwiftProtobuf decides, as without the lane.
    for odd: [UInt8] in [[0x18, 0x05], [0x1A, 0x01, 0x41, 0x18, 0x05], [0x1D, 1, 2, 3, 4]] {
      let lane = try? rig.decode(odd, as: Accelgate_V1_CompressRequest.self, field: 3)
      let plain = try? Accelgate_V1_CompressRequest(serializedBytes: odd)
      #expect(lane?.staged == nil)
      #expect(lane?.message == plain)
    }
    #expect(rig.isIdle)
  }

  @Test func malformedAndMutatedMessagesBehaveExactlyAsWithoutTheLane() async throws {
    let rig = try Rig()
    defer { rig.stop() }
    let good: [UInt8] = try Accelgate_V1_CompressRequest.with {
      $0.format = .gzip
      $0.level = 1
      $0.data = Self.payload(3000)
      $0.inputRegion = .with { $0.region = "x"; $0.offset = 12 }
    }.serializedBytes()
    var rng = SystemRandomNumberGenerator()
    var staged = 0
    var refused = 0
    for round in 0..<2000 {
      if round % 100 == 0 { await Task.yield() }
      var bytes = good
      switch round % 4 {
      case 0: bytes = Array(bytes.prefix(Int.random(in: 0..<bytes.count, using: &rng)))
      case 1:
        for _ in 0..<Int.random(in: 1...4, using: &rng) {
          bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
        }
      case 2:
        // Mutate only the framing at the front (tags and lengths).
        bytes[Int.random(in: 0..<min(8, bytes.count), using: &rng)] ^= UInt8(1 << Int.random(in: 0..<8, using: &rng))
      default:
        bytes.insert(UInt8.random(in: 0...255, using: &rng), at: Int.random(in: 0...bytes.count, using: &rng))
      }
      let plain = Result { try Accelgate_V1_CompressRequest(serializedBytes: bytes) }
      let lane = Result { try rig.decode(bytes, as: Accelgate_V1_CompressRequest.self, field: 3) }
      switch (plain, lane) {
      case (.success(let p), .success(let l)):
        #expect(Self.rebuilt(l) == p)
        if l.staged != nil { staged += 1 }
      case (.failure, .failure(let e)):
        refused += 1
        #expect(e is BinaryDecodingError, "refused as SwiftProtobuf refuses it (the edge answers INVALID_ARGUMENT)")
      default:
        Issue.record("lane and SwiftProtobuf disagree on \(bytes)")
      }
    }
    #expect(staged > 50 && refused > 50)
    #expect(rig.isIdle, "no staged byte leaked")
  }

  @Test func refusalsFallBackToACopyAndAreCounted() throws {
    let rig = try Rig(zone: 1 << 20)
    defer { rig.stop() }
    let bytes: [UInt8] = try Accelgate_V1_CompressRequest.with { $0.format = .gzip; $0.data = Self.payload(600_000) }
      .serializedBytes()
    // Zones of 1 MiB: one 600 kB payload fits each queue.
    let first = try rig.decode(bytes, as: Accelgate_V1_CompressRequest.self, field: 3)
    let second = try rig.decode(bytes, as: Accelgate_V1_CompressRequest.self, field: 3)
    #expect(first.staged != nil && second.staged != nil && first.staged?.queue !== second.staged?.queue)
    let third = try rig.decode(bytes, as: Accelgate_V1_CompressRequest.self, field: 3)
    #expect(third.staged == nil && third.message.data.count == 600_000, "the ordinary decode")
    let big = try rig.decode(bytes, as: Accelgate_V1_CompressRequest.self, field: 3, tenant: "u", maxPayload: 1000)
    #expect(big.staged == nil && big.message.data.count == 600_000)
    let text = String(decoding: rig.metrics.scrape(dispatcher: rig.dispatcher, device: nil, fallback: nil), as: UTF8.self)
    #expect(text.contains(#"accelgate_staging_refusals_total{tenant="t",reason="pool_full"} 1"#), "\(text)")
    #expect(text.contains(#"accelgate_staging_refusals_total{tenant="u",reason="too_large"} 1"#))
  }

  /// The parts of an answer, concatenated, as the C core sends them.
  static func wire(_ parts: [CorePart]) -> [UInt8] { parts.flatMap { Array($0.contents) } }

  @Test func answersFromThePoolAreWhatSwiftProtobufWouldWrite() async throws {
    let rig = try Rig()
    defer { rig.stop() }
    let data = Self.payload(200_000)
    var job = JobRequest(opcode: .compress, algorithm: .gzip, level: 1, input: data, outputCapacity: 250_000)
    job.output = .pooled
    let stats = Accelgate_V1_JobStats.with { $0.deviceNs = 12345; $0.engine = "isal-igzip"; $0.queueID = 1 }
    do {
      // Copied out of the pool (no `sent`): the lease goes back at once.
      let result = try await rig.dispatcher.execute(job)
      let pooled = try #require(result.pooledOutput)
      let output = pooled.withBytes { Data($0) }
      let parts = try CoreEdgeService.parts(LaneResponse(message: Accelgate_V1_CompressResponse.with { $0.stats = stats }, pooled: pooled), sent: nil)
      #expect(pooled.isReleased, "the lease goes back as soon as the bytes are out")
      #expect(Self.wire(parts) == (try Accelgate_V1_CompressResponse.with { $0.data = output; $0.stats = stats }.serializedBytes()))
    }
    do {
      // In place, with a prefix (a named key's envelope) before the pooled bytes.
      let result = try await rig.dispatcher.execute(job)
      let pooled = try #require(result.pooledOutput)
      let output = pooled.withBytes { Data($0) }
      let prefix = Data([0xA6, 1, 0, 0, 0, 3] + Array(repeating: 9, count: 12))
      let message = Accelgate_V1_EncryptResponse.with { $0.nonce = Data(repeating: 9, count: 12); $0.keyVersion = 3 }
      let given = Mutex(false)
      let parts = try CoreEdgeService.parts(LaneResponse(message: message, pooled: pooled, prefix: prefix)) {
        given.withLock { $0 = true }
      }
      var whole = message
      whole.ciphertext = prefix + output
      #expect(Self.wire(parts) == (try whole.serializedBytes()))
      #expect(!pooled.isReleased && !given.withLock { $0 }, "sent in place: the lease is held until the core lets go")
      parts.forEach { $0.releaseUnsent() }
      #expect(pooled.isReleased && given.withLock { $0 })
    }
    // Nothing pooled: plain SwiftProtobuf.
    let plain = Accelgate_V1_DecryptResponse.with { $0.plaintext = Data([1, 2, 3]); $0.keyVersion = 1 }
    #expect(Self.wire(try CoreEdgeService.parts(LaneResponse(message: plain), sent: nil)) == (try plain.serializedBytes()))
    for _ in 0..<500 where !rig.isIdle { try await Task.sleep(for: .milliseconds(10)) }
    #expect(rig.isIdle)
  }
}

/// The network lane through a whole gateway: copies per job with the lane off and on.
@Suite(.serialized, .timeLimit(.minutes(3))) struct NetworkLaneEndToEndTests {
  func withServer(
    _ configure: (inout ServiceConfiguration) -> Void,
    _ body: (Accelgate_V1_Accelerator.Client<HTTP2ClientTransport.Posix>, AccelGateServer) async throws -> Void
  ) async throws {
    let config = ServiceConfiguration.defaults {
      $0.port = 0
      $0.metricsPort = 0
      $0.device.engineCount = 1
      $0.device.dataPoolBytes = 32 << 20
      $0.device.idleSpin = .microseconds(10)
      configure(&$0)
    }
    let server = try AccelGateServer(configuration: config)
    try await withThrowingTaskGroup(of: Void.self) { group in
      group.addTask { try await server.serve() }
      var port: Int?
      for _ in 0..<200 where port == nil {
        port = try await server.listeningPort()
        if port == nil { try await Task.sleep(for: .milliseconds(10)) }
      }
      let p = try #require(port)
      try await withGRPCClient(
        transport: .http2NIOPosix(
          target: .ipv4(address: "127.0.0.1", port: p), transportSecurity: .plaintext,
          config: .defaults {
            $0.http2.maxFrameSize = 1 << 20
            $0.http2.targetWindowSize = 4 << 20
          })
      ) { client in
        try await body(Accelgate_V1_Accelerator.Client(wrapping: client), server)
      }
      server.shutdown()
      try await group.waitForAll()
    }
  }

  /// `name{labels…} value` samples of the rendered metrics whose labels include every `match`.
  static func sum(_ metrics: String, _ name: String, _ match: [String]) -> Double {
    metrics.split(separator: "\n").filter { line in
      line.hasPrefix(name + "{") && match.allSatisfy { line.contains($0) }
    }.compactMap { Double($0.split(separator: " ").last!) }.reduce(0, +)
  }

  static func waitIdle(_ server: AccelGateServer) async -> Bool {
    for _ in 0..<500 {
      let queues = server.dispatcher.driver.queues
      if queues.allSatisfy({ $0.poolFreeBytes == $0.poolCapacity && $0.leasedCount == 0 })
        && server.dispatcher.stagedBytesByTenant.isEmpty
      {
        return true
      }
      try? await Task.sleep(for: .milliseconds(10))
    }
    return false
  }

  @Test(arguments: [false, true])
  func oneMiBJobsCopyTwiceEachWayWithoutTheLaneAndWithItOnceInAndNoneOut(pooled: Bool) async throws {
    try await withServer({ $0.pooledPayloads = pooled }) { client, server in
      let text = NetworkLaneCodecTests.payload(1 << 20)
      let c = try await client.compress(.with { $0.format = .gzip; $0.level = 1; $0.data = text })
      let d = try await client.decompress(.with { $0.format = .gzip; $0.data = c.data })
      #expect(d.data == text)
      let key = Data((0..<32).map { UInt8($0) })
      let nonce = Data(repeating: 5, count: 12)
      let e = try await client.encrypt(.with {
        $0.algorithm = .aes256Gcm
        $0.key = .with { $0.raw = key }
        $0.nonce = nonce
        $0.plaintext = text
      })
      #expect(e.ciphertext.count == text.count + 16)
      let p = try await client.decrypt(.with {
        $0.algorithm = .aes256Gcm
        $0.key = .with { $0.raw = key }
        $0.nonce = nonce
        $0.ciphertext = e.ciphertext
      })
      #expect(p.plaintext == text)
      let m = server.renderMetrics()
      let path = pooled ? #"path="pooled""# : #"path="copied""#
      for op in ["compress", "decompress", "encrypt", "decrypt"] {
        for dir in ["in", "out"] {
          let l = [#"operation="\#(op)""#, #"direction="\#(dir)""#]
          let jobs = Self.sum(m, "accelgate_payload_jobs_total", l + [path])
          let copies = Self.sum(m, "accelgate_payload_copies_total", l + [path])
          #expect(jobs == 1, "\(op) \(dir): \(m)")
          // With the lane: staged straight into the pool, and answered from the pool in place.
          #expect(copies == (pooled ? (dir == "in" ? 1 : 0) : 2), "\(op) \(dir)")
        }
      }
      #expect(
        Self.sum(m, "accelgate_payload_copied_bytes_total", [#"operation="compress""#, #"direction="in""#])
          == Double((pooled ? 1 : 2) << 20))
      #expect(await Self.waitIdle(server), "every pool whole again")
    }
  }

  @Test func expiredAndCancelledCallsGiveTheirStagedPayloadsBack() async throws {
    // One slow engine: 1 MiB takes ~100 ms, so later calls wait and time out.
    try await withServer({ $0.device.engineThroughputCapMBps = 10 }) { client, server in
      let data = Data(repeating: 0x41, count: 1 << 20)
      try await withThrowingTaskGroup(of: RPCError.Code?.self) { group in
        for _ in 0..<6 {
          group.addTask {
            do {
              _ = try await client.compress(
                Accelgate_V1_CompressRequest.with { $0.format = .gzip; $0.level = 1; $0.data = data },
                options: .defaults.with { $0.timeout = .milliseconds(150) })
              return nil
            } catch let e as RPCError { return e.code }
          }
        }
        var codes: [RPCError.Code?] = []
        for try await c in group { codes.append(c) }
        #expect(codes.contains(.deadlineExceeded), "\(codes)")
      }
      #expect(await Self.waitIdle(server), "staged payloads of expired calls are freed")
      // Still serving, through the lane.
      let ok = try await client.compress(.with { $0.format = .gzip; $0.data = Data("after".utf8) })
      #expect(!ok.data.isEmpty)
      let m = server.renderMetrics()
      #expect(Self.sum(m, "accelgate_payload_jobs_total", [#"operation="compress""#, #"direction="in""#, #"path="pooled""#]) >= 1)
    }
  }
}

extension CallOptions {
  fileprivate func with(_ body: (inout Self) -> Void) -> Self {
    var c = self
    body(&c)
    return c
  }
}
