package import AccelABI
package import AccelDispatcher
internal import AccelDriver
package import AccelMessages
internal import CAccelCrypto
package import FoundationEssentials

/// An Encrypt request as a job, and how its result becomes the response.
package struct EncryptPlan: Sendable {
  package var plan: JobPlan
  package var nonce: Data
  package var key: KeyIdentity
  /// A named key's envelope header and nonce, which precede the ciphertext (empty for a raw key).
  package var envelopePrefix: Data

  /// The response for the job's result, and the bytes the network lane's
  /// serializer writes before a result left in the pool (`extraCopies`: the
  /// copies made here to build the envelope).
  package func response(_ result: JobResult) -> (message: Accelgate_V1_EncryptResponse, prefix: Data, extraCopies: UInt32) {
    var out = Accelgate_V1_EncryptResponse()
    out.nonce = nonce
    out.keyVersion = key.version
    out.stats = plan.stats(for: result)
    guard key != .raw else {
      out.ciphertext = result.output
      return (out, Data(), 0)
    }
    if result.pooledOutput != nil { return (out, envelopePrefix, 0) }
    var sealed = envelopePrefix
    sealed.append(result.output)
    out.ciphertext = sealed
    return (out, Data(), 1)
  }
}

/// A Decrypt request as a job.
package struct DecryptPlan: Sendable {
  package var plan: JobPlan
  package var key: KeyIdentity

  package func response(_ result: JobResult) -> Accelgate_V1_DecryptResponse {
    var out = Accelgate_V1_DecryptResponse()
    out.plaintext = result.output
    out.keyVersion = key.version
    out.stats = plan.stats(for: result)
    return out
  }
}

/// A Digest request as a job.
package struct DigestPlan: Sendable {
  package var plan: JobPlan
  package var key: KeyIdentity

  package func response(_ result: JobResult) -> Accelgate_V1_DigestResponse {
    var out = Accelgate_V1_DigestResponse()
    out.digest = result.output
    if result.output.count == 4 { out.checksum = result.output.reduce(0) { $0 << 8 | UInt32($1) } }
    out.stats = plan.stats(for: result)
    return out
  }
}

/// The key one job uses, resolved.
package struct ResolvedKey: Sendable {
  package var material: SecretBytes
  package var algorithm: DeviceAlgorithm
  /// Named keys only.
  package var named: NamedKey?
  package var version: UInt32

  package var identity: KeyIdentity { named.map { .named($0.name, version: version) } ?? .raw }
}

extension JobTranslator {
  // MARK: encrypt

  /// An Encrypt request as a job. A named key takes one nonce from the
  /// key version's budget here (`NonceLedger`), so a plan is made only for a
  /// job about to run.
  package func encrypt(
    _ r: Accelgate_V1_EncryptRequest, tenant: String, lane: PayloadLane = .copied, spans: SpanLengths = .none
  ) throws(RequestError) -> EncryptPlan {
    let key = try resolveKey(r.key, requested: r.algorithm, tenant: tenant)
    if (r.hasInputRegion || r.hasOutputRegion) && key.named != nil {
      throw .invalidArgument("local-lane regions take raw keys only (a named key's envelope is built by the gateway)")
    }
    let inputLength = spans.input ?? lane.payloadCount(inline: r.plaintext)
    try limits.check(payload: inputLength)
    try checkAAD(r.aad)
    var nonce = r.nonce
    if nonce.isEmpty {
      var fresh = [UInt8](repeating: 0, count: CryptoSizing.nonceLength)
      guard accel_random_bytes(&fresh, fresh.count) == 1 else { throw .internalFailure("no randomness") }
      nonce = Data(fresh)
    } else if key.named != nil {
      throw .invalidArgument("named keys draw their own random nonces; leave nonce empty")
    }
    guard nonce.count == CryptoSizing.nonceLength else {
      throw .invalidArgument("nonce must be 12 bytes, got \(nonce.count)")
    }
    if let named = key.named {
      do { try nonceLedger.take(key: named, version: key.version) } catch {
        let outcome = if case .exhausted = error { "exhausted" } else { "ledger-unavailable" }
        audit.record(tenant: tenant, key: named.name, version: key.version, operation: "encrypt", outcome: outcome)
        throw .key(error)
      }
    }
    let header = key.named != nil ? Envelope.header(keyVersion: key.version) : []
    let aux = AEADParameters.encode(nonce: nonce, aad: header + Array(r.aad))
    var steps = [DeviceStep(.encrypt, key.algorithm)]
    var mid = 0
    var body = inputLength
    var engine = "openssl-evp"
    if r.hasCompress {
      let (format, level) = try Self.chainedCompression(r.compress)
      steps.insert(DeviceStep(.compress, format, level: level), at: 0)
      mid = Int(BufferSizing.compressBound(UInt64(body)))
      body = mid
      engine = Self.engineName(.compress, format, level: level) + "+openssl-evp"
    }
    var job = JobRequest(
      steps: steps, input: r.plaintext, outputCapacity: body + CryptoSizing.tagLength, tenant: tenant, aux: aux,
      key: key.material, midCapacity: mid, sensitive: true)
    lane.apply(to: &job)
    if let o = spans.output, !r.hasCompress, o < job.outputCapacity {
      throw .invalidArgument("output_region holds \(o) bytes; the ciphertext and tag need \(job.outputCapacity)")
    }
    var prefix = Data(header)
    if key.named != nil { prefix.append(nonce) }
    return EncryptPlan(
      plan: JobPlan(job: job, operation: .encrypt, outputLimit: spans.output ?? job.outputCapacity, engine: engine),
      nonce: nonce, key: key.identity, envelopePrefix: prefix)
  }

  // MARK: decrypt

  /// A Decrypt request as a job. With a named key the ciphertext is an
  /// envelope; a staged ciphertext's envelope is read in the pool, and the
  /// job skips it there.
  package func decrypt(
    _ r: Accelgate_V1_DecryptRequest, tenant: String, lane: PayloadLane = .copied, spans: SpanLengths = .none
  ) throws(RequestError) -> DecryptPlan {
    var key = try resolveKey(r.key, requested: r.algorithm, tenant: tenant, forEncryption: false)
    if (r.hasInputRegion || r.hasOutputRegion) && key.named != nil {
      throw .invalidArgument("local-lane regions take raw keys only")
    }
    let cipherCount = lane.payloadCount(inline: r.ciphertext)
    let inputLength = spans.input ?? cipherCount
    // Whatever Encrypt can return must decrypt: allow the tag, the envelope and,
    // for chained jobs, the compress bound on top of the request limit.
    let sealedLimit = limits.sealedLimit
    guard cipherCount <= sealedLimit else { throw .payloadTooLarge(size: cipherCount, limit: sealedLimit) }
    try checkAAD(r.aad)
    var nonce = r.nonce
    var sealed = r.ciphertext
    var sealedCount = cipherCount
    var skip = 0
    var header: [UInt8] = []
    if let named = key.named {
      let head =
        lane.staged.map { Data(UnsafeRawBufferPointer($0.buffer).prefix(Envelope.overhead + CryptoSizing.tagLength)) }
        ?? r.ciphertext
      guard cipherCount >= Envelope.overhead + CryptoSizing.tagLength, let (version, n, body) = Envelope.parse(head) else {
        throw .invalidArgument("ciphertext is not an AccelGate key envelope or is truncated")
      }
      guard let kv = named.version(version) else {
        audit.record(tenant: tenant, key: named.name, version: version, operation: "decrypt", outcome: "unknown-version")
        throw .key(.versionUnknown(name: named.name, version: version))
      }
      guard version >= named.minDecryptionVersion, !kv.disabled else {
        audit.record(tenant: tenant, key: named.name, version: version, operation: "decrypt", outcome: "retired")
        throw .key(.versionRetired(name: named.name, version: version))
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
        throw .invalidArgument("nonce must be 12 bytes, got \(nonce.count)")
      }
      guard inputLength >= CryptoSizing.tagLength else {
        throw .invalidArgument("ciphertext is shorter than the 16-byte tag")
      }
    }
    let aux = AEADParameters.encode(nonce: nonce, aad: header + Array(r.aad))
    let plainLength = (spans.input ?? sealedCount) - CryptoSizing.tagLength
    let limit = limits.outputLimit(requested: r.maxOutputBytes)
    var steps = [DeviceStep(.decrypt, key.algorithm)]
    var mid = 0
    var capacity = plainLength
    var engine = "openssl-evp"
    if r.hasDecompress {
      let (format, _) = try Self.chainedCompression(r.decompress)
      steps.append(DeviceStep(.decompress, format))
      mid = plainLength
      capacity = limit
      engine = "openssl-evp+" + Self.engineName(.decompress, format, level: 0)
    } else if plainLength > limit {
      throw .payloadTooLarge(size: plainLength, limit: limit)
    }
    var job = JobRequest(
      steps: steps, input: sealed, outputCapacity: capacity, tenant: tenant, aux: aux, key: key.material,
      midCapacity: mid, sensitive: true)
    lane.apply(to: &job, skip: skip)
    job.admissionBytes = max(0, cipherCount - (sealedLimit - limits.maxRequestBytes))
    if let o = spans.output, !r.hasDecompress, o < plainLength {
      throw .invalidArgument("output_region holds \(o) bytes; the plaintext needs \(plainLength)")
    }
    return DecryptPlan(
      plan: JobPlan(job: job, operation: .decrypt, outputLimit: spans.output ?? capacity, engine: engine),
      key: key.identity)
  }

  // MARK: digest

  /// A Digest request (hash, HMAC or checksum) as a job.
  package func digest(_ r: Accelgate_V1_DigestRequest, tenant: String, spans: SpanLengths = .none) throws(RequestError)
    -> DigestPlan
  {
    let algorithm = try Self.digestAlgorithm(r.algorithm)
    try limits.check(payload: spans.input ?? r.data.count)
    var key: ResolvedKey?
    if algorithm.isKeyedDigest {
      guard r.hasKey, r.key.source != nil else { throw .invalidArgument("\(algorithm) needs a key") }
      var resolved = try resolveKey(r.key, requested: nil, digest: algorithm, tenant: tenant)
      // RFC 2104: keys longer than the hash's block are replaced by their hash.
      let block = algorithm == .hmacSHA256 ? 64 : 128
      if resolved.material.count > block {
        resolved.material = resolved.material.withBytes { b in
          var d = [UInt8](repeating: 0, count: algorithm == .hmacSHA256 ? 32 : 64)
          _ = algorithm == .hmacSHA256 ? accel_sha256(b.baseAddress, b.count, &d) : accel_sha512(b.baseAddress, b.count, &d)
          defer { accel_secure_zero(&d, d.count) }
          return SecretBytes(d)
        }
      }
      key = resolved
    } else if r.hasKey && r.key.source != nil {
      throw .invalidArgument("\(algorithm) takes no key")
    }
    let length = algorithm.digestLength ?? 0
    let job = JobRequest(
      steps: [DeviceStep(.digest, algorithm)], input: r.data, outputCapacity: length, tenant: tenant,
      key: key?.material, sensitive: key != nil)
    let engine =
      switch algorithm {
      case .crc32c, .crc32: "isal-crc"
      case .adler32: "zlib"
      default: "openssl-evp"
      }
    return DigestPlan(
      plan: JobPlan(job: job, operation: .digest, outputLimit: length, engine: engine), key: key?.identity ?? .raw)
  }

  // MARK: audit

  /// Records a named-key job's outcome in the audit log (raw keys are not audited).
  package func recordOutcome(_ key: KeyIdentity, tenant: String, operation: String, ok: Bool) {
    guard case .named(let name, let version) = key else { return }
    audit.record(tenant: tenant, key: name, version: version, operation: operation, outcome: ok ? "ok" : "error")
  }

  // MARK: keys

  /// Finds the key a request names and checks it fits the algorithm.
  package func resolveKey(
    _ spec: Accelgate_V1_KeySpec, requested: Accelgate_V1_CipherAlgorithm?, digest: DeviceAlgorithm? = nil,
    tenant: String, forEncryption: Bool = true
  ) throws(RequestError) -> ResolvedKey {
    switch spec.source {
    case .raw(let bytes):
      let algorithm = if let digest { digest } else { try Self.cipherAlgorithm(requested ?? .unspecified) }
      if let need = algorithm.aeadKeyLength, bytes.count != need {
        throw .invalidArgument("\(algorithm) needs a \(need)-byte key, got \(bytes.count)")
      }
      guard !bytes.isEmpty else { throw .invalidArgument("key is empty") }
      return ResolvedKey(material: SecretBytes(bytes), algorithm: algorithm, named: nil, version: 0)
    case .name(let name):
      guard keyring.path != nil else { throw .key(.noKeyring) }
      let named: NamedKey
      do { named = try keyring.current.lookup(name, tenant: tenant) } catch {
        audit.record(tenant: tenant, key: name, version: 0, operation: "lookup", outcome: "denied")
        throw .key(error)
      }
      if let digest {
        guard named.algorithm == digest else { throw .invalidArgument("key '\(name)' is \(named.algorithm), not \(digest)") }
      } else if let requested, requested != .unspecified {
        let alg = try Self.cipherAlgorithm(requested)
        guard alg == named.algorithm else { throw .invalidArgument("key '\(name)' is \(named.algorithm), not \(alg)") }
      }
      guard named.algorithm.aeadKeyLength != nil || digest != nil else {
        throw .invalidArgument("key '\(name)' is not an AEAD key")
      }
      // Encrypt only with a version that may also decrypt, so no envelope is ever unreadable.
      guard let newest = named.versions.last(where: { !$0.disabled && $0.version >= named.minDecryptionVersion }) else {
        throw .key(.noUsableVersion(name))
      }
      return ResolvedKey(material: newest.material, algorithm: named.algorithm, named: named, version: newest.version)
    case nil:
      throw .invalidArgument("key is required (raw bytes or a key name)")
    }
  }

  package static func cipherAlgorithm(_ a: Accelgate_V1_CipherAlgorithm) throws(RequestError) -> DeviceAlgorithm {
    switch a {
    case .aes128Gcm: return .aes128GCM
    case .aes256Gcm: return .aes256GCM
    case .chacha20Poly1305: return .chacha20Poly1305
    case .unspecified: throw .invalidArgument("algorithm must be set for a raw key")
    case .UNRECOGNIZED(let v): throw .invalidArgument("unknown cipher algorithm \(v)")
    }
  }

  package static func digestAlgorithm(_ a: Accelgate_V1_DigestAlgorithm) throws(RequestError) -> DeviceAlgorithm {
    guard a != .unspecified, let alg = DeviceAlgorithm(rawValue: UInt8(clamping: a.rawValue)), alg.digestLength != nil
    else { throw .invalidArgument("unknown or unset digest algorithm \(a.rawValue)") }
    return alg
  }

  private func checkAAD(_ aad: Data) throws(RequestError) {
    guard aad.count <= limits.maxAADBytes else { throw .payloadTooLarge(size: aad.count, limit: limits.maxAADBytes) }
  }
}
