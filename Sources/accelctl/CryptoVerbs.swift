import AccelGateLocal
import AccelProto
import AccelMessages
import ArgumentParser
import Foundation
import GRPCCore
import SwiftProtobuf

enum CipherArgument: String, ExpressibleByArgument, CaseIterable {
  case aes128gcm = "aes-128-gcm", aes256gcm = "aes-256-gcm", chacha20poly1305 = "chacha20-poly1305"
  var proto: Accelgate_V1_CipherAlgorithm {
    switch self {
    case .aes128gcm: .aes128Gcm
    case .aes256gcm: .aes256Gcm
    case .chacha20poly1305: .chacha20Poly1305
    }
  }
}

enum DigestArgument: String, ExpressibleByArgument, CaseIterable {
  case sha256, sha384, sha512, hmacSha256 = "hmac-sha256", hmacSha512 = "hmac-sha512", crc32c, crc32, adler32
  var proto: Accelgate_V1_DigestAlgorithm {
    switch self {
    case .sha256: .sha256
    case .sha384: .sha384
    case .sha512: .sha512
    case .hmacSha256: .hmacSha256
    case .hmacSha512: .hmacSha512
    case .crc32c: .crc32C
    case .crc32: .crc32
    case .adler32: .adler32
    }
  }
  var keyed: Bool { self == .hmacSha256 || self == .hmacSha512 }
}

/// Where a key comes from: a named key on the server, or raw bytes from a file
/// (never from the command line, which other users can read in /proc).
struct KeyOptions: ParsableArguments {
  @Option(help: "Name of a key in the server's keyring.") var keyName: String?
  @Option(help: "File holding the raw key (exactly the key bytes; or hex with --key-hex).") var keyFile: String?
  @Flag(help: "The key file holds hex, not raw bytes.") var keyHex = false

  func spec(required: Bool) throws -> Accelgate_V1_KeySpec? {
    switch (keyName, keyFile) {
    case (let name?, nil): return .with { $0.name = name }
    case (nil, let file?):
      var bytes = try Data(contentsOf: URL(fileURLWithPath: file))
      if keyHex {
        let text = String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard text.count % 2 == 0, let decoded = Data(hex: text) else { throw ValidationError("--key-file is not hex") }
        bytes = decoded
      }
      return .with { $0.raw = bytes }
    case (nil, nil):
      if required { throw ValidationError("give --key-name or --key-file") }
      return nil
    default:
      throw ValidationError("give either --key-name or --key-file, not both")
    }
  }
}

extension Data {
  init?(hex: String) {
    var out = Data(capacity: hex.count / 2)
    var it = hex.makeIterator()
    while let a = it.next() {
      guard let b = it.next(), let v = UInt8(String([a, b]), radix: 16) else { return nil }
      out.append(v)
    }
    self = out
  }
  var hex: String { map { String(format: "%02x", $0) }.joined() }
}

struct Encrypt: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Encrypt a file with an AEAD on the device.",
    discussion: """
      With a named key the output is the server's envelope (it carries the key version and \
      nonce; docs/KEYS.md). With a raw key the output is nonce (12 bytes) || ciphertext || tag, \
      which `accelctl decrypt` with the same key reads back.
      """)
  @OptionGroup var connection: ConnectionOptions
  @OptionGroup var io: IOOptions
  @OptionGroup var key: KeyOptions
  @Option(help: "aes-128-gcm, aes-256-gcm or chacha20-poly1305 (raw keys; named keys know theirs).")
  var algorithm: CipherArgument?
  @Option(help: "Additional authenticated data (a string).") var aad = ""
  @Option(help: "Compress before encrypting, in the same device job: deflate, zlib, gzip, zstd or lz4.") var compress: FormatArgument?

  func run() async throws {
    let plaintext = try io.read()
    let spec = try key.spec(required: true)!
    let raw = key.keyFile != nil
    if raw && algorithm == nil { throw ValidationError("a raw key needs --algorithm") }
    let (connection, algorithm, aad, compress, showStats) = (connection, algorithm, aad, compress, io.stats)
    let progress = ProgressBar(total: plaintext.count, label: "encrypt")
    if raw, let lane = try connection.localLane() {
      // Local lane (raw keys; a named key's envelope is built by the gateway):
      // plaintext and ciphertext stay in shared memory.
      let room = plaintext.count + (compress == nil ? 0 : plaintext.count / 4 + 65536) + 16
      let region = try lane.register(size: plaintext.count + room)
      defer { try? lane.unregister(region) }
      region.write(plaintext, at: 0)
      let response = try await connection.withClient { client in
        try await client.encrypt(
          .with {
            if let algorithm { $0.algorithm = algorithm.proto }
            $0.key = spec
            $0.aad = Data(aad.utf8)
            $0.inputRegion = region.span(0, plaintext.count)
            $0.outputRegion = region.span(plaintext.count, room)
            if let compress { $0.compress = .with { $0.format = compress.proto } }
          }, metadata: connection.metadata, options: connection.callOptions)
      }
      progress.update(plaintext.count)
      progress.finish()
      if showStats { printStats(response.stats) }
      try io.write(response.nonce + region.read(plaintext.count, Int(response.regionOutputLength)))
      return
    }
    let response = try await connection.withClient { client in
      try await client.encrypt(
        .with {
          if let algorithm { $0.algorithm = algorithm.proto }
          $0.key = spec
          $0.aad = Data(aad.utf8)
          $0.plaintext = plaintext
          if let compress { $0.compress = .with { $0.format = compress.proto } }
        }, metadata: connection.metadata, options: connection.callOptions)
    }
    progress.update(plaintext.count)
    progress.finish()
    if showStats { printStats(response.stats) }
    try io.write(raw ? response.nonce + response.ciphertext : response.ciphertext)
  }
}

struct Decrypt: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Decrypt what `accelctl encrypt` wrote.")
  @OptionGroup var connection: ConnectionOptions
  @OptionGroup var io: IOOptions
  @OptionGroup var key: KeyOptions
  @Option(help: "aes-128-gcm, aes-256-gcm or chacha20-poly1305 (raw keys).") var algorithm: CipherArgument?
  @Option(help: "Additional authenticated data (a string).") var aad = ""
  @Option(help: "Decompress after decrypting, in the same device job: deflate, zlib, gzip, zstd or lz4.") var decompress: FormatArgument?

  func run() async throws {
    var input = try io.read()
    let spec = try key.spec(required: true)!
    var nonce = Data()
    if key.keyFile != nil {
      guard algorithm != nil else { throw ValidationError("a raw key needs --algorithm") }
      guard input.count >= 12 + 16 else { throw ValidationError("input is shorter than a nonce and a tag") }
      nonce = input.prefix(12)
      input = input.dropFirst(12)
    }
    let (connection, algorithm, aad, decompress, showStats, ciphertext) = (connection, algorithm, aad, decompress, io.stats, Data(input))
    let theNonce = nonce
    if key.keyFile != nil, let lane = try connection.localLane() {
      // Local lane (raw keys): ciphertext and plaintext stay in shared memory. With
      // --decompress the output size is unknown; the memfd is sparse, so 64 MiB
      // of room costs only the pages written.
      let room = decompress == nil ? max(1, ciphertext.count - 16) : 64 << 20
      let region = try lane.register(size: ciphertext.count + room)
      defer { try? lane.unregister(region) }
      region.write(ciphertext, at: 0)
      let response = try await connection.withClient { client in
        try await client.decrypt(
          .with {
            if let algorithm { $0.algorithm = algorithm.proto }
            $0.key = spec
            $0.nonce = theNonce
            $0.aad = Data(aad.utf8)
            $0.inputRegion = region.span(0, ciphertext.count)
            $0.outputRegion = region.span(ciphertext.count, room)
            if let decompress { $0.decompress = .with { $0.format = decompress.proto } }
          }, metadata: connection.metadata, options: connection.callOptions)
      }
      if showStats { printStats(response.stats) }
      try io.write(region.read(ciphertext.count, Int(response.regionOutputLength)))
      return
    }
    let response = try await connection.withClient { client in
      try await client.decrypt(
        .with {
          if let algorithm { $0.algorithm = algorithm.proto }
          $0.key = spec
          $0.nonce = theNonce
          $0.aad = Data(aad.utf8)
          $0.ciphertext = ciphertext
          if let decompress { $0.decompress = .with { $0.format = decompress.proto } }
        }, metadata: connection.metadata, options: connection.callOptions)
    }
    if showStats { printStats(response.stats) }
    try io.write(response.plaintext)
  }
}

struct Digest: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Hash, HMAC or checksum a file on the device; prints hex.")
  @OptionGroup var connection: ConnectionOptions
  @Option(name: .shortAndLong, help: "Input file ('-' for stdin).") var input = "-"
  @Option(help: "sha256, sha384, sha512, hmac-sha256, hmac-sha512, crc32c, crc32 or adler32.")
  var algorithm: DigestArgument = .sha256
  @OptionGroup var key: KeyOptions
  @Flag(help: "Print job statistics to stderr.") var stats = false

  func run() async throws {
    let data = input == "-" ? FileHandle.standardInput.readDataToEndOfFile() : try Data(contentsOf: URL(fileURLWithPath: input))
    let spec = try key.spec(required: algorithm.keyed)
    if spec != nil && !algorithm.keyed { throw ValidationError("\(algorithm.rawValue) takes no key") }
    let (connection, algorithm) = (connection, algorithm)
    // Local lane: the input stays in shared memory (only the digest travels).
    let region = try connection.localLane().map { lane in (lane, try lane.register(size: max(1, data.count))) }
    defer { if let (lane, r) = region { try? lane.unregister(r) } }
    region?.1.write(data, at: 0)
    let response = try await connection.withClient { client in
      try await client.digest(
        .with {
          $0.algorithm = algorithm.proto
          if let spec { $0.key = spec }
          if let (_, r) = region { $0.inputRegion = r.span(0, data.count) } else { $0.data = data }
        }, metadata: connection.metadata, options: connection.callOptions)
    }
    if stats { printStats(response.stats) }
    print("\(response.digest.hex)  \(input == "-" ? "-" : input)")
  }
}

/// `grpc.health.v1` Check, for container health checks: exit 0 only when SERVING.
struct Health: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Check grpc.health.v1: prints the status; exits 0 only when SERVING (for container health checks).")
  @OptionGroup var connection: ConnectionOptions
  @Option(help: "Service name to check ('' = the whole server).") var service = ""

  func run() async throws {
    let (connection, service) = (connection, service)
    let status: Grpc_Health_V1_HealthCheckResponse.ServingStatus
    do {
      status = try await connection.withRawClient { client in
        try await Grpc_Health_V1_Health.Client(wrapping: client).check(
          Grpc_Health_V1_HealthCheckRequest.with { $0.service = service }, options: connection.callOptions
        ).status
      }
    } catch let error as RPCError {
      print("UNREACHABLE: \(error.code): \(error.message)")
      throw ExitCode(2)
    }
    switch status {
    case .serving: print("SERVING")
    default:
      print("\(status)".uppercased())
      throw ExitCode(1)
    }
  }
}

struct Status: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Health, device state, queues and recovery at a glance.")
  @OptionGroup var connection: ConnectionOptions
  @Flag(help: "Print JSON instead of text.") var json = false

  func run() async throws {
    let connection = connection
    let d = try await connection.withClient { client in
      try await client.describeDevice(
        Accelgate_V1_DescribeDeviceRequest(), metadata: connection.metadata, options: connection.callOptions)
    }
    if json {
      print(try d.jsonString())
      return
    }
    let state = !d.device.healthy ? "UNHEALTHY" : d.device.degraded ? "DEGRADED" : "healthy"
    print("device    \(d.device.name) \(d.device.mode), ABI \(d.device.abiVersion): \(state)")
    if !d.device.statusDetail.isEmpty { print("          \(d.device.statusDetail)") }
    print("recovery  retried jobs \(d.device.retriedJobs), isolated \(d.device.isolated), verify \(d.device.verifyCompression), faults \(d.device.faultInjection)")
    print("queue     id  state     in-flight  completed  resets  stalls  invalid")
    for q in d.queues {
      print(
        String(
          format: "          %-3d %@ %9d %10llu %7llu %7llu %8llu", q.id, q.state.padding(toLength: 9, withPad: " ", startingAt: 0), q.inFlight, q.completed, q.resets, q.stalls,
          q.invalidCompletions))
      if !q.recovery.isEmpty { print("              \(q.recovery)") }
    }
    for e in d.engines { print("engine    \(e.id): \(e.jobs) jobs, busy \(e.busyNs / 1_000_000) ms") }
    let t = d.tenant
    print(
      "tenant    \(t.id) (you): weight \(t.weight), waiting \(t.queuedJobs)/\(t.maxQueuedJobs) jobs, \(t.queuedBytes)/\(t.maxQueuedBytes) bytes, payload ≤ \(t.maxPayloadBytes) B\(t.maxBytesPerSecond > 0 ? ", rate ≤ \(t.maxBytesPerSecond) B/s" : "")"
    )
  }
}
