internal import AccelABI
internal import AccelDispatcher
internal import AccelDriver
internal import AccelProto
internal import FoundationEssentials
internal import GRPCCore
internal import SwiftProtobuf
internal import Synchronization

/// `CompressStream` and `DecompressStream`: stateful streams of any length.
///
/// The stream's engine state lives in a device stream context (ABI 1.3) on one
/// queue. Every incoming chunk becomes one device job (or a few, when the output
/// fills its buffer first and the device answers MORE_OUTPUT), scheduled fairly
/// like any other job. One slice waits behind the one running (read-ahead), and
/// the handler reads the next chunk only when fewer than two slices are pending,
/// so a stream holds at most one gRPC chunk and two slices in, and one piece
/// out; HTTP/2 flow control slows a client that sends faster than the device works.
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
    let stall = configuration.streamWriteTimeout
    return StreamingServerResponse { rawWriter in
      let writer = StallBoundedWriter(rawWriter, timeout: stall)
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
    let stall = configuration.streamWriteTimeout
    return StreamingServerResponse { rawWriter in
      let writer = StallBoundedWriter(rawWriter, timeout: stall)
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
///
/// Slices are read ahead: while one slice runs on the device the next one is
/// already queued (the dispatcher's chain for the stream keeps them in order and
/// one at a time), so the stream stays backlogged in the fair scheduler and can
/// claim its weight's share of device time. At most `readAhead` slices are held.
final class StreamSession: @unchecked Sendable {
  /// Slices queued or running at once: one on the device, one waiting behind it.
  static let readAhead = 2

  private struct Slice {
    let task: Task<JobResult, any Error>
    let input: Data
    let sequence: UInt64
    let final: Bool
  }

  let service: AcceleratorService
  let target: StreamTarget
  let algorithm: DeviceAlgorithm
  let level: UInt8
  let compress: Bool
  let tenant: String
  let deadline: CallDeadline
  var closed = false
  var totalIn: UInt64 = 0
  var totalOut: UInt64 = 0
  var deviceNanoseconds: UInt64 = 0
  var jobs: UInt32 = 0
  var outputCap: UInt64 = .max
  private var pipeline: [Slice] = []
  private var nextSequence: UInt64 = 0

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

  /// Ends the stream: slices still running are abandoned, waiting ones dropped,
  /// and the context goes back to its queue.
  func close() {
    guard !closed else { return }
    closed = true
    for slice in pipeline { slice.task.cancel() }
    pipeline.removeAll()
    service.dispatcher.closeStream(target)
  }

  /// Runs one chunk through the device in slices of at most `streamJobInput`,
  /// handing each piece of output to `emit` in order. Returns with up to
  /// `readAhead - 1` slices still on the device, unless `final`.
  func feed(_ data: Data, final: Bool, emit: (Data) async throws -> Void) async throws {
    let slice = AcceleratorService.streamJobInput
    var offset = data.startIndex
    repeat {
      let end = min(data.endIndex, offset + slice)
      await service.dispatcher.waitForRoom(tenant: tenant)
      submit(data.subdata(in: offset..<end), final: final && end == data.endIndex)
      offset = end
      while pipeline.count >= Self.readAhead { try await finishOldest(emit: emit) }
    } while offset < data.endIndex
    if final { while !pipeline.isEmpty { try await finishOldest(emit: emit) } }
  }

  private func submit(_ input: Data, final: Bool) {
    let sequence = nextSequence
    nextSequence += 1
    pipeline.append(Slice(task: start(input, final: final, sequence: sequence, continuing: false), input: input, sequence: sequence, final: final))
  }

  /// Queues one device job for the stream; the dispatcher runs it when its turn in the chain comes.
  private func start(_ input: Data, final: Bool, sequence: UInt64, continuing: Bool) -> Task<JobResult, any Error> {
    var step = DeviceStep(compress ? .compress : .decompress, algorithm, level: level)
    step.streamSlot = target.slot
    step.streamStart = sequence == 0 && !continuing
    step.streamFinal = final
    let room = outputCap >= totalOut ? outputCap - totalOut : 0
    let capacity =
      compress
      ? Int(BufferSizing.compressBound(UInt64(input.count)))
      : Int(min(UInt64(AcceleratorService.streamOutputPiece), room + 1))
    var job = JobRequest(steps: [step], input: input, outputCapacity: max(64, capacity), tenant: tenant)
    job.stream = target
    job.streamSequence = sequence
    let (service, deadline, operation) = (service, deadline, compress ? "compress" : "decompress")
    let outputLimit = Int(min(outputCap, UInt64(Int.max)))
    return Task { try await service.run(job, operation: operation, outputLimit: outputLimit, deadline: deadline) }
  }

  /// Waits for the oldest slice, emits its output, and continues it (same
  /// sequence, ahead of the slice queued behind it) while the device reports
  /// that its output buffer filled up first.
  private func finishOldest(emit: (Data) async throws -> Void) async throws {
    let slice = pipeline.removeFirst()
    var input = slice.input
    var task = slice.task
    while true {
      let result: JobResult
      do { result = try await task.value } catch {
        close()
        throw error
      }
      jobs += 1
      totalIn += UInt64(result.consumed)
      totalOut += UInt64(result.output.count)
      deviceNanoseconds += result.stats.deviceNanoseconds
      if totalOut > outputCap {
        close()
        throw RPCError(
          code: .resourceExhausted, message: "\(compress ? "compress" : "decompress"): output exceeds the limit of \(outputCap) bytes")
      }
      if !result.output.isEmpty { try await emit(result.output) }
      guard result.moreOutput else { return }
      input = result.consumed >= input.count ? Data() : input.subdata(in: input.startIndex + result.consumed..<input.endIndex)
      task = start(input, final: slice.final, sequence: slice.sequence, continuing: true)
    }
  }
}

/// A stream's response writer that gives up on a client that stops reading.
///
/// HTTP/2 flow control suspends a write while the client's window is shut, so
/// a client that stops reading would otherwise hold its stream (a device
/// context, two slices and a piece of output) until the call's deadline, or
/// for ever without one. A write that the client has not accepted within
/// `timeout` ends the call with RESOURCE_EXHAUSTED; the stuck write itself is
/// cancelled and not waited for (the transport fails it when the call ends).
struct StallBoundedWriter<Message: Sendable>: Sendable {
  let writer: RPCWriter<Message>
  let timeout: Duration

  init(_ writer: RPCWriter<Message>, timeout: Duration) {
    self.writer = writer
    self.timeout = timeout
  }

  func write(_ message: Message) async throws {
    let (writer, timeout) = (writer, timeout)
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
      let race = WriteRace(continuation)
      let write = Task {
        let outcome: Result<Void, any Error>
        do { outcome = .success(try await writer.write(message)) } catch { outcome = .failure(error) }
        race.finish(outcome)
      }
      race.arm(
        Task {
          guard (try? await Task.sleep(for: timeout)) != nil else { return }
          if race.finish(.failure(RPCError(
            code: .resourceExhausted,
            message: "the client accepted no stream output for \(timeout) (stream write timeout); the stream was ended")))
          {
            write.cancel()
          }
        })
    }
  }
}

/// Whichever finishes first, a write or its timer, resumes the handler; the other is then moot.
private final class WriteRace: Sendable {
  private let pending: Mutex<CheckedContinuation<Void, any Error>?>
  private let timer = Mutex<Task<Void, Never>?>(nil)

  init(_ continuation: CheckedContinuation<Void, any Error>) { pending = Mutex(continuation) }

  func arm(_ task: Task<Void, Never>) {
    timer.withLock { $0 = task }
    // Finished meanwhile (`finish` may have looked for the timer before it was set): stop it here.
    if pending.withLock({ $0 == nil }) { timer.withLock { $0.take() }?.cancel() }
  }

  /// Resumes the handler with `outcome` unless the other side already did; true when this call did.
  @discardableResult func finish(_ outcome: Result<Void, any Error>) -> Bool {
    guard let c = pending.withLock({ $0.take() }) else { return false }
    timer.withLock { $0.take() }?.cancel()
    c.resume(with: outcome)
    return true
  }
}
