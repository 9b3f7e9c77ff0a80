import AccelABI
import AccelDriver
import AccelMessages
import Foundation
import SwiftProtobuf
import Testing

@testable import AccelDispatcher
@testable import AccelRequests

/// Requests become jobs in AccelRequests (issue 17, Part 0): each case gives
/// the exact job or the exact refusal, with no transport and no device.
@Suite struct JobTranslatorTests {
  static let aesKey = Data(repeating: 7, count: 32)

  /// A translator over a keyring holding `orders` (tenant t, AES-256-GCM:
  /// version 1 retired below min 2, version 2 current) and `mac` (HMAC-SHA256).
  static func translator(limits: RequestLimits = RequestLimits(), audit: String? = nil) throws -> JobTranslator {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("translator-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let k1 = Data(repeating: 1, count: 32).base64EncodedString()
    let k2 = Data(repeating: 2, count: 32).base64EncodedString()
    let mac = Data(repeating: 3, count: 100).base64EncodedString()
    let yaml = """
      keys:
        - name: orders
          tenant: t
          algorithm: aes-256-gcm
          min_decryption_version: 2
          versions:
            - { version: 1, key: \(k1) }
            - { version: 2, key: \(k2) }
        - name: mac
          tenant: t
          algorithm: hmac-sha256
          versions:
            - { version: 1, key: \(mac) }
      """
    try yaml.write(toFile: dir + "/keys.yaml", atomically: true, encoding: .utf8)
    return JobTranslator(
      limits: limits, keyring: try KeyringDirectory(path: dir + "/keys.yaml"), nonceLedger: try NonceLedger(path: nil),
      audit: try AuditLog(path: audit))
  }

  static func rawKey() -> Accelgate_V1_KeySpec { .with { $0.raw = aesKey } }
  static func named(_ name: String) -> Accelgate_V1_KeySpec { .with { $0.name = name } }

  // MARK: compression

  @Test func compressMapsFormatLevelAndCapacity() throws {
    let t = try Self.translator()
    let plan = try t.compress(.with { $0.format = .zstd; $0.level = 19; $0.data = Data(count: 1000) }, tenant: "t")
    #expect(plan.job.steps == [DeviceStep(.compress, .zstd, level: 19)])
    #expect(plan.job.outputCapacity == Int(BufferSizing.compressBound(1000)))
    #expect(plan.outputLimit == plan.job.outputCapacity)
    #expect(plan.engine == "zstd")
    #expect(plan.operation == .compress)
    // Unset level: the format's default (gzip 6 → libdeflate).
    let gzip = try t.compress(.with { $0.format = .gzip }, tenant: "t")
    #expect(gzip.job.steps == [DeviceStep(.compress, .gzip, level: 6)])
    #expect(gzip.engine == "libdeflate")
  }

  @Test func compressRefusals() throws {
    let t = try Self.translator(limits: RequestLimits(maxRequestBytes: 100))
    #expect(throws: RequestError.invalidArgument("format must be set (DEFLATE, ZLIB, GZIP, ZSTD or LZ4)")) {
      try t.compress(.with { $0.data = Data([1]) }, tenant: "t")
    }
    #expect(throws: RequestError.invalidArgument("unknown compression format 99")) {
      try t.compress(.with { $0.format = .UNRECOGNIZED(99) }, tenant: "t")
    }
    #expect(throws: RequestError.invalidArgument("level 20 is outside 1...19 for zstd (or -1 for the default)")) {
      try t.compress(.with { $0.format = .zstd; $0.level = 20 }, tenant: "t")
    }
    #expect(throws: RequestError.payloadTooLarge(size: 101, limit: 100)) {
      try t.compress(.with { $0.format = .gzip; $0.data = Data(count: 101) }, tenant: "t")
    }
    // A span's length counts, not the (empty) inline payload.
    #expect(throws: RequestError.payloadTooLarge(size: 500, limit: 100)) {
      try t.compress(.with { $0.format = .gzip }, tenant: "t", spans: SpanLengths(input: 500))
    }
  }

  @Test func decompressOutputBound() throws {
    let t = try Self.translator(limits: RequestLimits(maxDecompressedBytes: 1 << 20))
    #expect(try t.decompress(.with { $0.format = .zlib }, tenant: "t").job.outputCapacity == 1 << 20)
    let capped = try t.decompress(.with { $0.format = .zlib; $0.maxOutputBytes = 4096 }, tenant: "t")
    #expect(capped.job.outputCapacity == 4096)
    #expect(capped.engine == "isal-inflate")
    let above = try t.decompress(.with { $0.format = .zlib; $0.maxOutputBytes = 1 << 40 }, tenant: "t")
    #expect(above.job.outputCapacity == 1 << 20)
    #expect(try t.decompress(.with { $0.format = .zlib }, tenant: "t", spans: SpanLengths(output: 77)).outputLimit == 77)
  }

  @Test func streamsRefuseLZ4() throws {
    #expect(throws: RequestError.invalidArgument("LZ4 is one-shot only; stream with DEFLATE, ZLIB, GZIP or ZSTD")) {
      try JobTranslator.streamAlgorithm(.lz4)
    }
    #expect(try JobTranslator.streamAlgorithm(.deflate) == .deflateRaw)
  }

  @Test func submitItemsCarryPayloadsOnly() throws {
    #expect(throws: RequestError.invalidArgument("job must be set")) { try JobTranslator.checkSubmitItem(.init()) }
    let spanned = Accelgate_V1_SubmitRequest.with { $0.digest = .with { $0.inputRegion = .with { $0.length = 1 } } }
    #expect(throws: RequestError.invalidArgument("Submit carries payloads; use the unary calls for local-lane regions")) {
      try JobTranslator.checkSubmitItem(spanned)
    }
    try JobTranslator.checkSubmitItem(.with { $0.compress = .with { $0.format = .gzip } })
  }

  // MARK: encrypt and decrypt

  @Test func encryptWithRawKeyAndChain() throws {
    let t = try Self.translator()
    let nonce = Data(repeating: 9, count: 12)
    let plan = try t.encrypt(
      .with {
        $0.key = Self.rawKey()
        $0.algorithm = .aes256Gcm
        $0.nonce = nonce
        $0.plaintext = Data(count: 100)
        $0.compress = .with { $0.format = .gzip; $0.level = 1 }
      }, tenant: "t")
    let mid = Int(BufferSizing.compressBound(100))
    #expect(plan.plan.job.steps == [DeviceStep(.compress, .gzip, level: 1), DeviceStep(.encrypt, .aes256GCM)])
    #expect(plan.plan.job.midCapacity == mid)
    #expect(plan.plan.job.outputCapacity == mid + CryptoSizing.tagLength)
    #expect(plan.plan.job.aux == AEADParameters.encode(nonce: nonce, aad: [UInt8]()))
    #expect(plan.plan.engine == "isal-igzip+openssl-evp")
    #expect(plan.key == .raw)
    #expect(plan.envelopePrefix.isEmpty)
  }

  @Test func encryptWithNamedKeyBuildsTheEnvelope() throws {
    let t = try Self.translator()
    let plan = try t.encrypt(.with { $0.key = Self.named("orders"); $0.plaintext = Data(count: 10); $0.aad = Data([5]) }, tenant: "t")
    #expect(plan.key == .named("orders", version: 2))
    let header = Envelope.header(keyVersion: 2)
    #expect(plan.envelopePrefix == Data(header) + plan.nonce)
    #expect(plan.plan.job.aux == AEADParameters.encode(nonce: plan.nonce, aad: header + [5]))
    #expect(plan.plan.job.key?.withBytes { Data($0) } == Data(repeating: 2, count: 32))
    let named = try t.keyring.current.lookup("orders", tenant: "t")
    #expect(t.nonceLedger.used(key: named, version: 2) == 1)
    // The envelope goes before the result, or to the pooled serializer.
    let result = JobResult(output: Data([1, 2, 3]), stats: JobStatistics())
    let (message, prefix, copies) = plan.response(result)
    #expect(message.ciphertext == plan.envelopePrefix + Data([1, 2, 3]))
    #expect(prefix.isEmpty && copies == 1)
    #expect(message.keyVersion == 2)
    #expect(throws: RequestError.invalidArgument("named keys draw their own random nonces; leave nonce empty")) {
      try t.encrypt(.with { $0.key = Self.named("orders"); $0.nonce = Data(count: 12) }, tenant: "t")
    }
  }

  @Test func keyRefusals() throws {
    let log = FileManager.default.temporaryDirectory.appendingPathComponent("audit-\(UUID().uuidString)").path
    let t = try Self.translator(audit: log)
    #expect(throws: RequestError.key(.otherTenant("orders"))) {
      try t.encrypt(.with { $0.key = Self.named("orders") }, tenant: "u")
    }
    #expect(try String(contentsOfFile: log, encoding: .utf8).contains(#""outcome":"denied""#))
    #expect(throws: RequestError.key(.notFound("nope"))) { try t.encrypt(.with { $0.key = Self.named("nope") }, tenant: "t") }
    #expect(throws: RequestError.invalidArgument("key is required (raw bytes or a key name)")) {
      try t.encrypt(.init(), tenant: "t")
    }
    #expect(throws: RequestError.invalidArgument("aes256GCM needs a 32-byte key, got 3")) {
      try t.encrypt(.with { $0.key = .with { $0.raw = Data([1, 2, 3]) }; $0.algorithm = .aes256Gcm }, tenant: "t")
    }
    #expect(throws: RequestError.invalidArgument("algorithm must be set for a raw key")) {
      try t.encrypt(.with { $0.key = Self.rawKey() }, tenant: "t")
    }
    let noKeyring = JobTranslator(
      limits: RequestLimits(), keyring: try KeyringDirectory(path: nil), nonceLedger: try NonceLedger(path: nil),
      audit: try AuditLog(path: nil))
    #expect(throws: RequestError.key(.noKeyring)) { try noKeyring.encrypt(.with { $0.key = Self.named("orders") }, tenant: "t") }
  }

  /// Issue 17, finding 1: a 16-byte ciphertext before gzip leaves nothing
  /// between the steps; the chain still gets a real middle buffer.
  @Test func decryptChainOfAnEmptyPlaintextHasAMiddleBuffer() throws {
    let t = try Self.translator(limits: RequestLimits(maxDecompressedBytes: 1 << 16))
    let plan = try t.decrypt(
      .with {
        $0.key = Self.rawKey()
        $0.algorithm = .aes256Gcm
        $0.nonce = Data(count: 12)
        $0.ciphertext = Data(count: 16)
        $0.decompress = .with { $0.format = .gzip }
      }, tenant: "t")
    #expect(plan.plan.job.steps == [DeviceStep(.decrypt, .aes256GCM), DeviceStep(.decompress, .gzip)])
    #expect(plan.plan.job.midCapacity == 1)
    #expect(plan.plan.job.outputCapacity == 1 << 16)
    #expect(plan.plan.engine == "openssl-evp+isal-inflate")
  }

  @Test func decryptRefusals() throws {
    let t = try Self.translator(limits: RequestLimits(maxDecompressedBytes: 100))
    let raw = Accelgate_V1_DecryptRequest.with { $0.key = Self.rawKey(); $0.algorithm = .aes256Gcm; $0.nonce = Data(count: 12) }
    var short = raw
    short.ciphertext = Data(count: 15)
    #expect(throws: RequestError.invalidArgument("ciphertext is shorter than the 16-byte tag")) { try t.decrypt(short, tenant: "t") }
    var big = raw
    big.ciphertext = Data(count: 117)
    #expect(throws: RequestError.payloadTooLarge(size: 101, limit: 100)) { try t.decrypt(big, tenant: "t") }
    // A retired version's envelope: refused, named.
    var sealed = Data(Envelope.header(keyVersion: 1))
    sealed.append(Data(count: 12 + 16))
    #expect(throws: RequestError.key(.versionRetired(name: "orders", version: 1))) {
      try t.decrypt(.with { $0.key = Self.named("orders"); $0.ciphertext = sealed }, tenant: "t")
    }
    #expect(throws: RequestError.invalidArgument("ciphertext is not an AccelGate key envelope or is truncated")) {
      try t.decrypt(.with { $0.key = Self.named("orders"); $0.ciphertext = Data(count: 40) }, tenant: "t")
    }
    // An output span too small for the plaintext.
    var spanned = raw
    spanned.ciphertext = Data(count: 50)
    #expect(throws: RequestError.invalidArgument("output_region holds 10 bytes; the plaintext needs 34")) {
      try t.decrypt(spanned, tenant: "t", spans: SpanLengths(output: 10))
    }
  }

  @Test func decryptOfANamedEnvelopeUsesItsVersion() throws {
    let t = try Self.translator()
    var sealed = Data(Envelope.header(keyVersion: 2))
    sealed.append(Data(repeating: 4, count: 12))
    sealed.append(Data(count: 20))
    let plan = try t.decrypt(.with { $0.key = Self.named("orders"); $0.ciphertext = sealed }, tenant: "t")
    #expect(plan.key == .named("orders", version: 2))
    #expect(plan.plan.job.inlineInput == Data(count: 20))
    #expect(plan.plan.job.outputCapacity == 4)
    #expect(plan.plan.job.aux == AEADParameters.encode(nonce: Data(repeating: 4, count: 12), aad: Envelope.header(keyVersion: 2)))
  }

  // MARK: digest

  @Test func digests() throws {
    let t = try Self.translator()
    let crc = try t.digest(.with { $0.algorithm = .crc32C; $0.data = Data(count: 5) }, tenant: "t")
    #expect(crc.plan.job.outputCapacity == 4)
    #expect(crc.plan.engine == "isal-crc")
    #expect(crc.response(JobResult(output: Data([0, 0, 1, 2]), stats: JobStatistics())).checksum == 258)
    // RFC 2104: the 100-byte HMAC-SHA256 key is replaced by its SHA-256.
    let mac = try t.digest(.with { $0.algorithm = .hmacSha256; $0.key = Self.named("mac") }, tenant: "t")
    #expect(mac.plan.job.key?.count == 32)
    #expect(mac.key == .named("mac", version: 1))
    #expect(throws: RequestError.invalidArgument("hmacSHA256 needs a key")) {
      try t.digest(.with { $0.algorithm = .hmacSha256 }, tenant: "t")
    }
    #expect(throws: RequestError.invalidArgument("sha256 takes no key")) {
      try t.digest(.with { $0.algorithm = .sha256; $0.key = Self.rawKey() }, tenant: "t")
    }
    #expect(throws: RequestError.invalidArgument("unknown or unset digest algorithm 0")) { try t.digest(.init(), tenant: "t") }
  }
}
