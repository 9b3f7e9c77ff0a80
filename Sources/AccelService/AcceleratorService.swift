internal import AccelABI
internal import AccelDevice
internal import AccelDispatcher
internal import AccelProto
internal import FoundationEssentials
internal import GRPCCore

/// The gRPC face of the gateway: validates requests, turns them into jobs,
/// and maps outcomes to responses and statuses. No device logic lives here.
struct AcceleratorService: Accelgate_V1_Accelerator.SimpleServiceProtocol {
  let dispatcher: Dispatcher
  let configuration: ServiceConfiguration
  let device: EmulatedDevice?

  static let defaultLevel: Int32 = 6

  func compress(request: Accelgate_V1_CompressRequest, context: ServerContext) async throws
    -> Accelgate_V1_CompressResponse
  {
    let algorithm = try Self.algorithm(request.format)
    let level = request.hasLevel ? request.level : -1
    guard level == -1 || (0...9).contains(level) else {
      throw StatusMapping.rpcError(.invalidArgument("level \(level) is outside 0...9 (or -1 for the default)"))
    }
    try checkSize(request.data.count)
    let effectiveLevel = UInt8(level == -1 ? Self.defaultLevel : level)
    let capacity = Int(BufferSizing.compressBound(UInt64(request.data.count)))
    let result = try await run(
      JobRequest(
        opcode: .compress, algorithm: algorithm, level: effectiveLevel, input: request.data, outputCapacity: capacity),
      operation: "compress", outputLimit: capacity)
    var response = Accelgate_V1_CompressResponse()
    response.data = result.output
    response.stats = Self.stats(result.stats, engine: Self.engineName(.compress, level: effectiveLevel))
    return response
  }

  func decompress(request: Accelgate_V1_DecompressRequest, context: ServerContext) async throws
    -> Accelgate_V1_DecompressResponse
  {
    let algorithm = try Self.algorithm(request.format)
    try checkSize(request.data.count)
    let limit =
      request.maxOutputBytes == 0
      ? configuration.maxDecompressedBytes : Int(min(UInt64(configuration.maxDecompressedBytes), request.maxOutputBytes))
    let result = try await run(
      JobRequest(opcode: .decompress, algorithm: algorithm, input: request.data, outputCapacity: limit),
      operation: "decompress", outputLimit: limit)
    var response = Accelgate_V1_DecompressResponse()
    response.data = result.output
    response.stats = Self.stats(result.stats, engine: Self.engineName(.decompress, level: 0))
    return response
  }

  func describeDevice(request: Accelgate_V1_DescribeDeviceRequest, context: ServerContext) async throws
    -> Accelgate_V1_DescribeDeviceResponse
  {
    DeviceDescription.make(dispatcher: dispatcher, device: device, configuration: configuration)
  }

  // MARK: helpers

  /// Runs a job, cancelling it if the RPC is cancelled (client gone or its deadline passed).
  private func run(_ job: JobRequest, operation: String, outputLimit: Int) async throws -> JobResult {
    let id = dispatcher.makeJobID()
    do {
      return try await withRPCCancellationHandler { () async throws(JobError) -> JobResult in
        try await dispatcher.execute(job, id: id)
      } onCancelRPC: { [dispatcher] in
        dispatcher.cancel(id: id)
      }
    } catch {
      throw StatusMapping.rpcError(error, operation: operation, outputLimit: outputLimit)
    }
  }

  private func checkSize(_ size: Int) throws {
    guard size <= configuration.maxRequestBytes else {
      throw StatusMapping.rpcError(.payloadTooLarge(size: size, limit: configuration.maxRequestBytes))
    }
  }

  static func algorithm(_ format: Accelgate_V1_CompressionFormat) throws -> DeviceAlgorithm {
    switch format {
    case .deflate: return .deflateRaw
    case .zlib: return .zlib
    case .gzip: return .gzip
    case .unspecified: throw StatusMapping.rpcError(.invalidArgument("format must be set (DEFLATE, ZLIB or GZIP)"))
    case .UNRECOGNIZED(let v): throw StatusMapping.rpcError(.invalidArgument("unknown compression format \(v)"))
    }
  }

  static func engineName(_ op: DeviceOpcode, level: UInt8) -> String {
    if op == .decompress { return "isal-inflate" }
    return level == 0 ? "zlib" : level <= 3 ? "isal-igzip" : "libdeflate"
  }

  static func stats(_ s: JobStatistics, engine: String) -> Accelgate_V1_JobStats {
    var out = Accelgate_V1_JobStats()
    out.queueWaitNs = s.queueWaitNanoseconds
    out.deviceNs = s.deviceNanoseconds
    out.totalNs = s.totalNanoseconds
    out.inputBytes = s.inputBytes
    out.outputBytes = s.outputBytes
    out.queueID = s.queueID
    out.engineID = s.engineID
    out.batchSize = s.batchSize
    out.engine = engine
    return out
  }
}
