internal import AccelABI
internal import AccelDispatcher
internal import AccelDriver
internal import AccelProto
internal import FoundationEssentials
internal import GRPCCore
internal import SwiftProtobuf

/// `CompressStream` and `DecompressStream`: stateful streams of any length.
///
/// The stream's engine state lives in a device stream context (ABI 1.3) on one
/// queue. Every incoming chunk becomes one device job (or a few, when the output
/// fills its buffer first and the device answers MORE_OUTPUT), scheduled fairly
/// like any other job; the handler reads the next chunk only after the last one
/// is done, so a stream holds at most one chunk in and one piece out, and HTTP/2
/// flow control slows a client that sends faster than the device works.
extension AcceleratorService {
  /// Largest piece of decompressed output one device job produces.
  static let streamOutputPiece = 1 << 20
  /// Largest input one stream device job takes: a gRPC chunk of several MiB is
  /// fed as several jobs, so an engine is held for one slice at a time and other
  /// tenants' jobs interleave (the fair scheduler's latency bound is one job).
  static let streamJobInput = 1 << 20

  func compressStream(
    request: StreamingServerRequest<Accelgate_V1_CompressStreamRequest>, context: ServerContext
  ) async throws -> StreamingServerResponse<Accelgate_V1_CompressStreamResponse> {
    let tenant = TenantHeader.tenant(of: request.metadata)
    let deadline = CallDeadline(metadata: request.metadata)
    return StreamingServerResponse { writer in
      var session: StreamSession?
      defer { session?.close() }
      var ended = false
      for try await m in request.messages {
        guard !ended else { throw RPCError(code: .invalidArgument, message: "data after the final chunk") }
        if session == nil {
          let algorithm = try Self.streamAlgorithm(m.format)
          let level = try Self.level(m.hasLevel ? m.level : -1, for: algorithm)
          session = try StreamSession(self, algorithm: algorithm, level: level, compress: true, tenant: tenant, deadline: deadline)
        }
        try checkSize(m.data.count)
        try await session!.feed(m.data, final: m.final) { piece in try await writer.write(.with { $0.data = piece }) }
        ended = m.final
      }
      guard let s = session else { throw RPCError(code: .invalidArgument, message: "the stream carried no messages") }
      if !ended { try await s.feed(Data(), final: true) { piece in try await writer.write(.with { $0.data = piece }) } }
      try await writer.write(
        .with {
          $0.final = true
          $0.totalIn = s.totalIn
          $0.totalOut = s.totalOut
          $0.deviceNs = s.deviceNanoseconds
          $0.jobs = s.jobs
        })
      return [:]
    }
  }

  func decompressStream(
    request: StreamingServerRequest<Accelgate_V1_DecompressStreamRequest>, context: ServerContext
  ) async throws -> StreamingServerResponse<Accelgate_V1_DecompressStreamResponse> {
    let tenant = TenantHeader.tenant(of: request.metadata)
    let deadline = CallDeadline(metadata: request.metadata)
    let serverCap = UInt64(configuration.maxStreamOutputBytes)
    return StreamingServerResponse { writer in
      var session: StreamSession?
      defer { session?.close() }
      var ended = false
      for try await m in request.messages {
        guard !ended else { throw RPCError(code: .invalidArgument, message: "data after the final chunk") }
        if session == nil {
          let algorithm = try Self.streamAlgorithm(m.format)
          session = try StreamSession(self, algorithm: algorithm, level: 0, compress: false, tenant: tenant, deadline: deadline)
          session!.outputCap = m.maxOutputBytes == 0 ? serverCap : min(serverCap, m.maxOutputBytes)
        }
        try checkSize(m.data.count)
        try await session!.feed(m.data, final: m.final) { piece in try await writer.write(.with { $0.data = piece }) }
        ended = m.final
      }
      guard let s = session else { throw RPCError(code: .invalidArgument, message: "the stream carried no messages") }
      if !ended { try await s.feed(Data(), final: true) { piece in try await writer.write(.with { $0.data = piece }) } }
      try await writer.write(
        .with {
          $0.final = true
          $0.totalIn = s.totalIn
          $0.totalOut = s.totalOut
          $0.deviceNs = s.deviceNanoseconds
          $0.jobs = s.jobs
        })
      return [:]
    }
  }

  static func streamAlgorithm(_ format: Accelgate_V1_CompressionFormat) throws -> DeviceAlgorithm {
    let algorithm = try algorithm(format)
    guard algorithm != .lz4 else {
      throw RPCError(code: .invalidArgument, message: "LZ4 is one-shot only; stream with DEFLATE, ZLIB, GZIP or ZSTD")
    }
    return algorithm
  }
}

/// One open stream: its device context, its position and its totals.
final class StreamSession: @unchecked Sendable {
  let service: AcceleratorService
  let target: StreamTarget
  let algorithm: DeviceAlgorithm
  let level: UInt8
  let compress: Bool
  let tenant: String
  let deadline: CallDeadline
  var started = false
  var closed = false
  var totalIn: UInt64 = 0
  var totalOut: UInt64 = 0
  var deviceNanoseconds: UInt64 = 0
  var jobs: UInt32 = 0
  var outputCap: UInt64 = .max

  init(
    _ service: AcceleratorService, algorithm: DeviceAlgorithm, level: UInt8, compress: Bool, tenant: String,
    deadline: CallDeadline
  ) throws {
    self.service = service
    self.algorithm = algorithm
    self.level = level
    self.compress = compress
    self.tenant = tenant
    self.deadline = deadline
    do { target = try service.dispatcher.openStream() } catch {
      throw StatusMapping.rpcError(error, operation: compress ? "compress" : "decompress", outputLimit: 0)
    }
  }

  func close() {
    guard !closed else { return }
    closed = true
    service.dispatcher.closeStream(target)
  }

  /// Runs one chunk through the device in slices of at most `streamJobInput`,
  /// handing each piece of output to `emit`.
  func feed(_ data: Data, final: Bool, emit: (Data) async throws -> Void) async throws {
    let slice = AcceleratorService.streamJobInput
    var offset = data.startIndex
    repeat {
      let end = min(data.endIndex, offset + slice)
      try await feedSlice(data.subdata(in: offset..<end), final: final && end == data.endIndex, emit: emit)
      offset = end
    } while offset < data.endIndex
  }

  private func feedSlice(_ data: Data, final: Bool, emit: (Data) async throws -> Void) async throws {
    var input = data
    let operation = compress ? "compress" : "decompress"
    while true {
      var step = DeviceStep(compress ? .compress : .decompress, algorithm, level: level)
      step.streamSlot = target.slot
      step.streamStart = !started
      step.streamFinal = final
      let room = outputCap >= totalOut ? outputCap - totalOut : 0
      let capacity =
        compress
        ? Int(BufferSizing.compressBound(UInt64(input.count)))
        : Int(min(UInt64(AcceleratorService.streamOutputPiece), room + 1))
      var job = JobRequest(steps: [step], input: input, outputCapacity: max(64, capacity), tenant: tenant)
      job.stream = target
      await service.dispatcher.waitForRoom(tenant: tenant)
      let result = try await service.run(job, operation: operation, outputLimit: Int(min(outputCap, UInt64(Int.max))), deadline: deadline)
      started = true
      jobs += 1
      totalIn += UInt64(result.consumed)
      totalOut += UInt64(result.output.count)
      deviceNanoseconds += result.stats.deviceNanoseconds
      if totalOut > outputCap {
        throw RPCError(code: .resourceExhausted, message: "\(operation): output exceeds the limit of \(outputCap) bytes")
      }
      if !result.output.isEmpty { try await emit(result.output) }
      guard result.moreOutput else { return }
      input = result.consumed >= input.count ? Data() : input.subdata(in: input.startIndex + result.consumed..<input.endIndex)
    }
  }
}
