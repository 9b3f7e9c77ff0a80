package import AccelABI
package import AccelDispatcher
package import AccelMessages

/// Turns API requests into device jobs: every check a request must pass
/// before it reaches the dispatcher, the mapping of formats, levels and
/// algorithms onto device steps, key resolution and the nonce budget of named
/// keys. Refusals are typed (`RequestError`); the edge maps them to statuses.
///
/// It knows nothing of the transport: the gRPC edge and the local lane call
/// it with the decoded message, how its payload arrived (`PayloadLane`) and
/// the lengths of any client-memory spans (`SpanLengths`), then run the plan.
package struct JobTranslator: Sendable {
  package var limits: RequestLimits
  package let keyring: KeyringDirectory
  package let nonceLedger: NonceLedger
  package let audit: AuditLog

  package init(limits: RequestLimits, keyring: KeyringDirectory, nonceLedger: NonceLedger, audit: AuditLog) {
    self.limits = limits
    self.keyring = keyring
    self.nonceLedger = nonceLedger
    self.audit = audit
  }

  /// The default level of the deflate family (zlib's).
  package static let defaultLevel: Int32 = 6

  // MARK: compression

  /// A Compress request as a job.
  package func compress(
    _ request: Accelgate_V1_CompressRequest, tenant: String, lane: PayloadLane = .copied, spans: SpanLengths = .none
  ) throws(RequestError) -> JobPlan {
    let algorithm = try Self.algorithm(request.format)
    let level = try Self.level(request.hasLevel ? request.level : -1, for: algorithm)
    let length = spans.input ?? lane.payloadCount(inline: request.data)
    try limits.check(payload: length)
    let capacity = Int(BufferSizing.compressBound(UInt64(length)))
    var job = JobRequest(
      opcode: .compress, algorithm: algorithm, level: level, input: request.data, outputCapacity: capacity,
      tenant: tenant)
    lane.apply(to: &job)
    return JobPlan(
      job: job, operation: .compress, outputLimit: spans.output ?? capacity,
      engine: Self.engineName(.compress, algorithm, level: level))
  }

  /// A Decompress request as a job. Its output bound is
  /// `limits.outputLimit(requested: request.maxOutputBytes)`.
  package func decompress(
    _ request: Accelgate_V1_DecompressRequest, tenant: String, lane: PayloadLane = .copied, spans: SpanLengths = .none
  ) throws(RequestError) -> JobPlan {
    let algorithm = try Self.algorithm(request.format)
    try limits.check(payload: spans.input ?? lane.payloadCount(inline: request.data))
    let limit = limits.outputLimit(requested: request.maxOutputBytes)
    var job = JobRequest(opcode: .decompress, algorithm: algorithm, input: request.data, outputCapacity: limit, tenant: tenant)
    lane.apply(to: &job)
    return JobPlan(
      job: job, operation: .decompress, outputLimit: spans.output ?? limit,
      engine: Self.engineName(.decompress, algorithm, level: 0))
  }

  /// Refuses what no Submit item may carry: region spans (they are for the
  /// unary calls on the local socket only, docs/LOCAL_LANE.md) and an unset job.
  package static func checkSubmitItem(_ item: Accelgate_V1_SubmitRequest) throws(RequestError) {
    let namesRegions =
      switch item.job {
      case .compress(let r): r.hasInputRegion || r.hasOutputRegion
      case .decompress(let r): r.hasInputRegion || r.hasOutputRegion
      case .encrypt(let r): r.hasInputRegion || r.hasOutputRegion
      case .decrypt(let r): r.hasInputRegion || r.hasOutputRegion
      case .digest(let r): r.hasInputRegion
      case nil: throw .invalidArgument("job must be set")
      }
    guard !namesRegions else {
      throw .invalidArgument("Submit carries payloads; use the unary calls for local-lane regions")
    }
  }

  // MARK: streams

  /// The format of a compression stream (LZ4 is one-shot only).
  package static func streamAlgorithm(_ format: Accelgate_V1_CompressionFormat) throws(RequestError) -> DeviceAlgorithm {
    let algorithm = try algorithm(format)
    guard algorithm != .lz4 else {
      throw .invalidArgument("LZ4 is one-shot only; stream with DEFLATE, ZLIB, GZIP or ZSTD")
    }
    return algorithm
  }

  // MARK: formats, levels and engines

  package static func algorithm(_ format: Accelgate_V1_CompressionFormat) throws(RequestError) -> DeviceAlgorithm {
    switch format {
    case .deflate: return .deflateRaw
    case .zlib: return .zlib
    case .gzip: return .gzip
    case .zstd: return .zstd
    case .lz4: return .lz4
    case .unspecified: throw .invalidArgument("format must be set (DEFLATE, ZLIB, GZIP, ZSTD or LZ4)")
    case .UNRECOGNIZED(let v): throw .invalidArgument("unknown compression format \(v)")
    }
  }

  /// Levels each format accepts, and its default (used for -1 or an unset level).
  package static func levels(_ algorithm: DeviceAlgorithm) -> (range: ClosedRange<Int32>, default: Int32) {
    switch algorithm {
    case .zstd: (1...19, 3)
    case .lz4: (0...12, 0)
    default: (0...9, defaultLevel)
    }
  }

  package static func level(_ requested: Int32, for algorithm: DeviceAlgorithm) throws(RequestError) -> UInt8 {
    let (range, fallback) = levels(algorithm)
    guard requested == -1 || range.contains(requested) else {
      let name = algorithm == .zstd ? " for zstd" : algorithm == .lz4 ? " for lz4" : ""
      throw .invalidArgument(
        "level \(requested) is outside \(range.lowerBound)...\(range.upperBound)\(name) (or -1 for the default)")
    }
    return UInt8(requested == -1 ? fallback : requested)
  }

  /// The engine the emulated device runs for a step (the response's stats name it).
  package static func engineName(_ op: DeviceOpcode, _ algorithm: DeviceAlgorithm, level: UInt8) -> String {
    switch algorithm {
    case .zstd: return "zstd"
    case .lz4: return op == .compress && level >= 3 ? "lz4hc" : "lz4"
    default:
      if op == .decompress { return "isal-inflate" }
      return level == 0 ? "zlib" : level <= 3 ? "isal-igzip" : "libdeflate"
    }
  }

  /// The compression step of a compress-and-encrypt (or decrypt-and-decompress) chain.
  package static func chainedCompression(_ c: Accelgate_V1_ChainedCompression) throws(RequestError) -> (DeviceAlgorithm, UInt8) {
    let format = try algorithm(c.format)
    return (format, try level(c.hasLevel ? c.level : -1, for: format))
  }
}
