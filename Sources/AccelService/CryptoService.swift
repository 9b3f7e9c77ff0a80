internal import AccelABI
internal import AccelDispatcher
internal import AccelDriver
internal import AccelMessages
internal import AccelRequests
internal import FoundationEssentials

/// Encrypt, Decrypt and Digest: the translator (AccelRequests) checks each
/// request and builds its job; this runs it and answers.
extension AcceleratorService {
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
    let spans = try localSpans(
      input: r.inputRegionIfSet, output: r.outputRegionIfSet,
      inline: lane.payloadCount(inline: r.plaintext), tenant: tenant, operation: "encrypt", outputLimit: Int(UInt32.max))
    let translator = self.translator
    let plan = try translator.encrypt(r, tenant: tenant, lane: lane, spans: spans.lengths)
    let result: JobResult
    do {
      result = try await run(plan.plan, spans: spans, deadline: deadline)
    } catch {
      translator.recordOutcome(plan.key, tenant: tenant, operation: "encrypt", ok: false)
      throw error
    }
    translator.recordOutcome(plan.key, tenant: tenant, operation: "encrypt", ok: true)
    var (out, prefix, extraCopies) = plan.response(result)
    recordCopies(tenant: tenant, operation: "encrypt", lane: lane, spans: spans, result: result, extraOut: extraCopies)
    if spans.output != nil { out.regionOutputLength = result.stats.outputBytes }
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
    let spans = try localSpans(
      input: r.inputRegionIfSet, output: r.outputRegionIfSet,
      inline: lane.payloadCount(inline: r.ciphertext), tenant: tenant, operation: "decrypt",
      outputLimit: configuration.maxDecompressedBytes)
    let translator = self.translator
    let plan = try translator.decrypt(r, tenant: tenant, lane: lane, spans: spans.lengths)
    let result: JobResult
    do {
      result = try await run(plan.plan, spans: spans, deadline: deadline)
    } catch {
      translator.recordOutcome(plan.key, tenant: tenant, operation: "decrypt", ok: false)
      throw error
    }
    translator.recordOutcome(plan.key, tenant: tenant, operation: "decrypt", ok: true)
    recordCopies(tenant: tenant, operation: "decrypt", lane: lane, spans: spans, result: result)
    var out = plan.response(result)
    if spans.output != nil { out.regionOutputLength = result.stats.outputBytes }
    return LaneResponse(message: out, pooled: result.pooledOutput)
  }

  func digest(_ r: Accelgate_V1_DigestRequest, tenant: String, deadline: CallDeadline) async throws
    -> Accelgate_V1_DigestResponse
  {
    _ = try JobTranslator.digestAlgorithm(r.algorithm)  // refused as such before any span is bound
    let spans = try localSpans(
      input: r.hasInputRegion ? r.inputRegion : nil, output: nil, inline: r.data.count, tenant: tenant,
      operation: "digest", outputLimit: 0)
    let translator = self.translator
    let plan = try translator.digest(r, tenant: tenant, spans: spans.lengths)
    let result = try await run(plan.plan, spans: spans, deadline: deadline)
    // Digests take the generated coding (the network lane stages only encrypt, decrypt,
    // compress and decompress): one copy in, and the digest itself out.
    recordCopies(tenant: tenant, operation: "digest", lane: .copied, spans: spans, result: result)
    translator.recordOutcome(plan.key, tenant: tenant, operation: plan.plan.operation.auditName, ok: true)
    return plan.response(result)
  }
}
