internal import AccelABI
internal import AccelDispatcher
internal import AccelDriver
internal import AccelProto
internal import CAccelCrypto
internal import FoundationEssentials
internal import GRPCCore

/// The named-key envelope (docs/KEYS.md):
/// `A6 01 | key version (u32, big-endian) | nonce (12) | ciphertext || tag (16)`.
/// The first six bytes are also prepended to the caller's AAD, so a ciphertext
/// cannot be replayed under another key version.
enum Envelope {
  static let marker: UInt8 = 0xA6
  static let formatVersion: UInt8 = 1
  static let headerLength = 6
  static let overhead = headerLength + CryptoSizing.nonceLength

  static func header(keyVersion: UInt32) -> [UInt8] {
    [marker, formatVersion, UInt8(keyVersion >> 24), UInt8(keyVersion >> 16 & 0xff), UInt8(keyVersion >> 8 & 0xff),
      UInt8(keyVersion & 0xff)]
  }

  /// (key version, nonce, ciphertext || tag), or nil if `data` is not an envelope.
  static func parse(_ data: Data) -> (UInt32, Data, Data)? {
    guard data.count >= overhead + CryptoSizing.tagLength else { return nil }
    let b = data.startIndex
    guard data[b] == marker, data[b + 1] == formatVersion else { return nil }
    let v = data[(b + 2)..<(b + 6)].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    return (v, data[(b + 6)..<(b + overhead)], data[(b + overhead)...])
  }
}

/// Resolved key for one job.
struct ResolvedKey {
  var material: SecretBytes
  var algorithm: DeviceAlgorithm
  /// Named keys only.
  var named: NamedKey?
  var version: UInt32
}

extension AcceleratorService {
  static let maxAADBytes = 64 * 1024

  // MARK: RPCs

  func encrypt(request envelope: ServerRequest<Accelgate_V1_EncryptRequest>, context: ServerContext) async throws
    -> ServerResponse<Accelgate_V1_EncryptResponse>
  {
    let tenant = TenantHeader.tenant(of: envelope.metadata)
    return ServerResponse(
      message: try await encrypt(envelope.message, tenant: tenant, deadline: CallDeadline(metadata: envelope.metadata)))
  }

  /// The largest ciphertext Decrypt takes: whatever Encrypt can return (the
  /// tag, the envelope and, for chained jobs, the compress bound on top of the request limit).
  var sealedLimit: Int {
    Int(BufferSizing.compressBound(UInt64(configuration.maxRequestBytes))) + CryptoSizing.tagLength + Envelope.overhead
  }

  func decrypt(request envelope: ServerRequest<Accelgate_V1_DecryptRequest>, context: ServerContext) async throws
    -> ServerResponse<Accelgate_V1_DecryptResponse>
  {
    let tenant = TenantHeader.tenant(of: envelope.metadata)
    return ServerResponse(
      message: try await decrypt(envelope.message, tenant: tenant, deadline: CallDeadline(metadata: envelope.metadata)))
  }

  func digest(request envelope: ServerRequest<Accelgate_V1_DigestRequest>, context: ServerContext) async throws
    -> ServerResponse<Accelgate_V1_DigestResponse>
  {
    let tenant = TenantHeader.tenant(of: envelope.metadata)
    return ServerResponse(
      message: try await digest(envelope.message, tenant: tenant, deadline: CallDeadline(metadata: envelope.metadata)))
  }

  // MARK: operations (shared with Submit)

  func encrypt(_ r: Accelgate_V1_EncryptRequest, tenant: String, deadline: CallDeadline) async throws
    -> Accelgate_V1_EncryptResponse
  {
    try await encrypt(r, tenant: tenant, deadline: deadline, lane: .copied).message
  }

  /// One Encrypt, whichever way its payload travels (`PayloadLane`).
  func encrypt(_ r: Accelgate_V1_EncryptRequest, tenant: String, deadline: CallDeadline, lane: PayloadLane) async throws
    -> LaneResponse<Accelgate_V1_EncryptResponse>
  {
    let key = try resolveKey(r.key, requested: r.algorithm, tenant: tenant, forEncryption: true)
    if (r.hasInputRegion || r.hasOutputRegion) && key.named != nil {
      throw StatusMapping.rpcError(
        .invalidArgument("local-lane regions take raw keys only (a named key's envelope is built by the gateway)"))
    }
    let spans = try localSpans(
      input: r.hasInputRegion ? r.inputRegion : nil, output: r.hasOutputRegion ? r.outputRegion : nil,
      inline: lane.payloadCount(inline: r.plaintext), tenant: tenant, operation: "encrypt", outputLimit: Int(UInt32.max))
    try checkSize(spans.inputLength)
    guard r.aad.count <= Self.maxAADBytes else {
      throw StatusMapping.rpcError(.payloadTooLarge(size: r.aad.count, limit: Self.maxAADBytes))
    }
    var nonce = r.nonce
    if nonce.isEmpty {
      var fresh = [UInt8](repeating: 0, count: CryptoSizing.nonceLength)
      guard accel_random_bytes(&fresh, fresh.count) == 1 else { throw RPCError(code: .internalError, message: "no randomness") }
      nonce = Data(fresh)
    } else if key.named != nil {
      throw StatusMapping.rpcError(.invalidArgument("named keys draw their own random nonces; leave nonce empty"))
    }
    guard nonce.count == CryptoSizing.nonceLength else {
      throw StatusMapping.rpcError(.invalidArgument("nonce must be 12 bytes, got \(nonce.count)"))
    }
    if let named = key.named {
      do { try nonceLedger.take(key: named, version: key.version) } catch {
        let outcome = if case .exhausted = error { "exhausted" } else { "ledger-unavailable" }
        audit.record(tenant: tenant, key: named.name, version: key.version, operation: "encrypt", outcome: outcome)
        throw StatusMapping.rpcError(error)
      }
    }
    let header = key.named != nil ? Envelope.header(keyVersion: key.version) : []
    let aux = AEADParameters.encode(nonce: nonce, aad: header + Array(r.aad))
    var steps = [DeviceStep(.encrypt, key.algorithm)]
    var mid = 0
    var body = spans.inputLength
    var engine = "openssl-evp"
    if r.hasCompress {
      let (format, level) = try chainedCompression(r.compress)
      steps.insert(DeviceStep(.compress, format, level: level), at: 0)
      mid = Int(BufferSizing.compressBound(UInt64(body)))
      body = mid
      engine = Self.engineName(.compress, format, level: level) + "+openssl-evp"
    }
    var job = JobRequest(
      steps: steps, input: r.plaintext, outputCapacity: body + CryptoSizing.tagLength, tenant: tenant, aux: aux,
      key: key.material, midCapacity: mid, sensitive: true)
    lane.apply(to: &job)
    if let o = spans.output, !r.hasCompress, Int(o.length) < job.outputCapacity {
      throw StatusMapping.rpcError(
        .invalidArgument("output_region holds \(o.length) bytes; the ciphertext and tag need \(job.outputCapacity)"))
    }
    spans.apply(to: &job)
    let result: JobResult
    do {
      result = try await run(job, operation: "encrypt", outputLimit: job.outputCapacity, deadline: deadline)
    } catch {
      if let named = key.named { audit.record(tenant: tenant, key: named.name, version: key.version, operation: "encrypt", outcome: "error") }
      throw error
    }
    var out = Accelgate_V1_EncryptResponse()
    out.nonce = nonce
    out.keyVersion = key.version
    var prefix = Data()
    if key.named != nil {
      var sealed = Data(header)
      sealed.append(nonce)
      if result.pooledOutput != nil {
        prefix = sealed  // the serializer writes the result from the pool after it
      } else {
        sealed.append(result.output)
        out.ciphertext = sealed
      }
      audit.record(tenant: tenant, key: key.named!.name, version: key.version, operation: "encrypt", outcome: "ok")
    } else {
      out.ciphertext = result.output
    }
    recordCopies(
      tenant: tenant, operation: "encrypt", lane: lane, spans: spans, result: result,
      extraOut: key.named != nil && result.pooledOutput == nil ? 1 : 0)
    if spans.output != nil { out.regionOutputLength = result.stats.outputBytes }
    out.stats = Self.stats(result.stats, engine: engine)
    return LaneResponse(message: out, pooled: result.pooledOutput, prefix: prefix)
  }

  func decrypt(_ r: Accelgate_V1_DecryptRequest, tenant: String, deadline: CallDeadline) async throws
    -> Accelgate_V1_DecryptResponse
  {
    try await decrypt(r, tenant: tenant, deadline: deadline, lane: .copied).message
  }

  /// One Decrypt, whichever way its payload travels (`PayloadLane`).
  func decrypt(_ r: Accelgate_V1_DecryptRequest, tenant: String, deadline: CallDeadline, lane: PayloadLane) async throws
    -> LaneResponse<Accelgate_V1_DecryptResponse>
  {
    var key = try resolveKey(r.key, requested: r.algorithm, tenant: tenant, forEncryption: false)
    if (r.hasInputRegion || r.hasOutputRegion) && key.named != nil {
      throw StatusMapping.rpcError(.invalidArgument("local-lane regions take raw keys only"))
    }
    let cipherCount = lane.payloadCount(inline: r.ciphertext)
    let spans = try localSpans(
      input: r.hasInputRegion ? r.inputRegion : nil, output: r.hasOutputRegion ? r.outputRegion : nil,
      inline: cipherCount, tenant: tenant, operation: "decrypt", outputLimit: configuration.maxDecompressedBytes)
    // Whatever Encrypt can return must decrypt: allow the tag, the envelope and,
    // for chained jobs, the compress bound on top of the request limit.
    let sealedLimit = self.sealedLimit
    guard cipherCount <= sealedLimit else {
      throw StatusMapping.rpcError(.payloadTooLarge(size: cipherCount, limit: sealedLimit))
    }
    guard r.aad.count <= Self.maxAADBytes else {
      throw StatusMapping.rpcError(.payloadTooLarge(size: r.aad.count, limit: Self.maxAADBytes))
    }
    var nonce = r.nonce
    var sealed = r.ciphertext
    var sealedCount = cipherCount
    var skip = 0
    var header: [UInt8] = []
    if let named = key.named {
      // A staged ciphertext's envelope is read in the pool; the job skips it there.
      let head =
        lane.staged.map { Data(UnsafeRawBufferPointer($0.buffer).prefix(Envelope.overhead + CryptoSizing.tagLength)) }
        ?? r.ciphertext
      guard cipherCount >= Envelope.overhead + CryptoSizing.tagLength, let (version, n, body) = Envelope.parse(head) else {
        throw StatusMapping.rpcError(.invalidArgument("ciphertext is not an AccelGate key envelope or is truncated"))
      }
      guard let kv = named.version(version) else {
        audit.record(tenant: tenant, key: named.name, version: version, operation: "decrypt", outcome: "unknown-version")
        throw StatusMapping.rpcError(KeyError.versionUnknown(name: named.name, version: version))
      }
      guard version >= named.minDecryptionVersion, !kv.disabled else {
        audit.record(tenant: tenant, key: named.name, version: version, operation: "decrypt", outcome: "retired")
        throw StatusMapping.rpcError(KeyError.versionRetired(name: named.name, version: version))
      }
      key.material = kv.material
      key.version = version
      nonce = n
      sealed = lane.staged == nil ? body : Data()
      sealedCount = cipherCount - Envelope.overhead
      skip = Envelope.overhead
      header = Envelope.header(keyVersion: version)
    } else {
      guard nonce.count == CryptoSizing.nonceLength else {
        throw StatusMapping.rpcError(.invalidArgument("nonce must be 12 bytes, got \(nonce.count)"))
      }
      guard spans.inputLength >= CryptoSizing.tagLength else {
        throw StatusMapping.rpcError(.invalidArgument("ciphertext is shorter than the 16-byte tag"))
      }
    }
    let aux = AEADParameters.encode(nonce: nonce, aad: header + Array(r.aad))
    let plainLength = (spans.input != nil ? spans.inputLength : sealedCount) - CryptoSizing.tagLength
    let limit =
      r.maxOutputBytes == 0
      ? configuration.maxDecompressedBytes : Int(min(UInt64(configuration.maxDecompressedBytes), r.maxOutputBytes))
    var steps = [DeviceStep(.decrypt, key.algorithm)]
    var mid = 0
    var capacity = plainLength
    var engine = "openssl-evp"
    if r.hasDecompress {
      let (format, _) = try chainedCompression(r.decompress)
      steps.append(DeviceStep(.decompress, format))
      mid = plainLength
      capacity = limit
      engine = "openssl-evp+" + Self.engineName(.decompress, format, level: 0)
    } else if plainLength > limit {
      throw StatusMapping.rpcError(.payloadTooLarge(size: plainLength, limit: limit))
    }
    var job = JobRequest(
      steps: steps, input: sealed, outputCapacity: capacity, tenant: tenant, aux: aux, key: key.material,
      midCapacity: mid, sensitive: true)
    lane.apply(to: &job, skip: skip)
    job.admissionBytes = max(0, cipherCount - (sealedLimit - configuration.maxRequestBytes))
    if let o = spans.output, !r.hasDecompress, Int(o.length) < plainLength {
      throw StatusMapping.rpcError(.invalidArgument("output_region holds \(o.length) bytes; the plaintext needs \(plainLength)"))
    }
    spans.apply(to: &job)
    let result: JobResult
    do {
      result = try await run(job, operation: "decrypt", outputLimit: capacity, deadline: deadline)
    } catch {
      if let named = key.named {
        audit.record(tenant: tenant, key: named.name, version: key.version, operation: "decrypt", outcome: "error")
      }
      throw error
    }
    if let named = key.named {
      audit.record(tenant: tenant, key: named.name, version: key.version, operation: "decrypt", outcome: "ok")
    }
    recordCopies(tenant: tenant, operation: "decrypt", lane: lane, spans: spans, result: result)
    var out = Accelgate_V1_DecryptResponse()
    out.plaintext = result.output
    if spans.output != nil { out.regionOutputLength = result.stats.outputBytes }
    out.keyVersion = key.version
    out.stats = Self.stats(result.stats, engine: engine)
    return LaneResponse(message: out, pooled: result.pooledOutput)
  }

  func digest(_ r: Accelgate_V1_DigestRequest, tenant: String, deadline: CallDeadline) async throws
    -> Accelgate_V1_DigestResponse
  {
    let algorithm = try Self.digestAlgorithm(r.algorithm)
    let spans = try localSpans(
      input: r.hasInputRegion ? r.inputRegion : nil, output: nil, inline: r.data.count, tenant: tenant,
      operation: "digest", outputLimit: 0)
    try checkSize(spans.inputLength)
    var key: ResolvedKey?
    if algorithm.isKeyedDigest {
      guard r.hasKey, r.key.source != nil else {
        throw StatusMapping.rpcError(.invalidArgument("\(algorithm) needs a key"))
      }
      key = try resolveKey(r.key, requested: nil, digest: algorithm, tenant: tenant, forEncryption: true)
      // RFC 2104: keys longer than the hash's block are replaced by their hash.
      let block = algorithm == .hmacSHA256 ? 64 : 128
      if key!.material.count > block {
        key!.material = key!.material.withBytes { b in
          var d = [UInt8](repeating: 0, count: algorithm == .hmacSHA256 ? 32 : 64)
          _ = algorithm == .hmacSHA256 ? accel_sha256(b.baseAddress, b.count, &d) : accel_sha512(b.baseAddress, b.count, &d)
          defer { accel_secure_zero(&d, d.count) }
          return SecretBytes(d)
        }
      }
    } else if r.hasKey && r.key.source != nil {
      throw StatusMapping.rpcError(.invalidArgument("\(algorithm) takes no key"))
    }
    let length = algorithm.digestLength!
    var job = JobRequest(
      steps: [DeviceStep(.digest, algorithm)], input: r.data, outputCapacity: length, tenant: tenant,
      key: key?.material, sensitive: key != nil)
    spans.apply(to: &job)
    let result = try await run(job, operation: "digest", outputLimit: length, deadline: deadline)
    // Digests take the generated coding (the network lane stages only encrypt, decrypt,
    // compress and decompress): one copy in, and the digest itself out.
    recordCopies(tenant: tenant, operation: "digest", lane: .copied, spans: spans, result: result)
    if let named = key?.named {
      audit.record(tenant: tenant, key: named.name, version: key!.version, operation: "hmac", outcome: "ok")
    }
    var out = Accelgate_V1_DigestResponse()
    out.digest = result.output
    if length == 4 { out.checksum = result.output.reduce(0) { $0 << 8 | UInt32($1) } }
    let engine =
      switch algorithm {
      case .crc32c, .crc32: "isal-crc"
      case .adler32: "zlib"
      default: "openssl-evp"
      }
    out.stats = Self.stats(result.stats, engine: engine)
    return out
  }

  // MARK: helpers

  /// Finds the key a request names and checks it fits the algorithm.
  func resolveKey(
    _ spec: Accelgate_V1_KeySpec, requested: Accelgate_V1_CipherAlgorithm?, digest: DeviceAlgorithm? = nil,
    tenant: String, forEncryption: Bool
  ) throws -> ResolvedKey {
    switch spec.source {
    case .raw(let bytes):
      let algorithm = try digest ?? Self.cipherAlgorithm(requested ?? .unspecified)
      if let need = algorithm.aeadKeyLength, bytes.count != need {
        throw StatusMapping.rpcError(.invalidArgument("\(algorithm) needs a \(need)-byte key, got \(bytes.count)"))
      }
      guard !bytes.isEmpty else { throw StatusMapping.rpcError(.invalidArgument("key is empty")) }
      return ResolvedKey(material: SecretBytes(bytes), algorithm: algorithm, named: nil, version: 0)
    case .name(let name):
      guard keyring.path != nil else { throw StatusMapping.rpcError(KeyError.noKeyring) }
      let named: NamedKey
      do { named = try keyring.current.lookup(name, tenant: tenant) } catch {
        audit.record(tenant: tenant, key: name, version: 0, operation: "lookup", outcome: "denied")
        throw StatusMapping.rpcError(error)
      }
      if let digest {
        guard named.algorithm == digest else {
          throw StatusMapping.rpcError(.invalidArgument("key '\(name)' is \(named.algorithm), not \(digest)"))
        }
      } else if let requested, requested != .unspecified {
        let alg = try Self.cipherAlgorithm(requested)
        guard alg == named.algorithm else {
          throw StatusMapping.rpcError(.invalidArgument("key '\(name)' is \(named.algorithm), not \(alg)"))
        }
      }
      guard named.algorithm.aeadKeyLength != nil || digest != nil else {
        throw StatusMapping.rpcError(.invalidArgument("key '\(name)' is not an AEAD key"))
      }
      // Encrypt only with a version that may also decrypt, so no envelope is ever unreadable.
      guard let newest = named.versions.last(where: { !$0.disabled && $0.version >= named.minDecryptionVersion }) else {
        throw StatusMapping.rpcError(KeyError.noUsableVersion(name))
      }
      return ResolvedKey(material: newest.material, algorithm: named.algorithm, named: named, version: newest.version)
    case nil:
      throw StatusMapping.rpcError(.invalidArgument("key is required (raw bytes or a key name)"))
    }
  }

  func chainedCompression(_ c: Accelgate_V1_ChainedCompression) throws -> (DeviceAlgorithm, UInt8) {
    let format = try Self.algorithm(c.format)
    return (format, try Self.level(c.hasLevel ? c.level : -1, for: format))
  }

  static func cipherAlgorithm(_ a: Accelgate_V1_CipherAlgorithm) throws -> DeviceAlgorithm {
    switch a {
    case .aes128Gcm: return .aes128GCM
    case .aes256Gcm: return .aes256GCM
    case .chacha20Poly1305: return .chacha20Poly1305
    case .unspecified: throw StatusMapping.rpcError(.invalidArgument("algorithm must be set for a raw key"))
    case .UNRECOGNIZED(let v): throw StatusMapping.rpcError(.invalidArgument("unknown cipher algorithm \(v)"))
    }
  }

  static func digestAlgorithm(_ a: Accelgate_V1_DigestAlgorithm) throws -> DeviceAlgorithm {
    guard a != .unspecified, let alg = DeviceAlgorithm(rawValue: UInt8(clamping: a.rawValue)), alg.digestLength != nil
    else { throw StatusMapping.rpcError(.invalidArgument("unknown or unset digest algorithm \(a.rawValue)")) }
    return alg
  }
}
