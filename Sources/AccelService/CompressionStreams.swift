internal import AccelABI
internal import AccelDispatcher
internal import AccelDriver
internal import AccelRequests
internal import AccelMessages
internal import FoundationEssentials
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

  /// One CompressStream.
  func compressStream(
    _ io: StreamIO<Accelgate_V1_CompressStreamRequest, Accelgate_V1_CompressStreamResponse>, tenant: String,
    deadline: CallDeadline
  ) async throws {
    try await serveCompressionStream(io) { m in
      let algorithm = try JobTranslator.streamAlgorithm(m.format)
      let level = try JobTranslator.level(m.hasLevel ? m.level : -1, for: algorithm)
      return try StreamSession(self, algorithm: algorithm, level: level, compress: true, tenant: tenant, deadline: deadline)
    } chunk: { ($0.data, $0.final) }
  }

  /// One DecompressStream.
  func decompressStream(
    _ io: StreamIO<Accelgate_V1_DecompressStreamRequest, Accelgate_V1_DecompressStreamResponse>, tenant: String,
    deadline: CallDeadline
  ) async throws {
    let serverCap = UInt64(configuration.maxStreamOutputBytes)
    try await serveCompressionStream(io) { m in
      let algorithm = try JobTranslator.streamAlgorithm(m.format)
      let cap = m.maxOutputBytes == 0 ? serverCap : min(serverCap, m.maxOutputBytes)
      return try StreamSession(
        self, algorithm: algorithm, level: 0, compress: false, tenant: tenant, deadline: deadline, outputCap: cap)
    } chunk: { ($0.data, $0.final) }
  }

  /// A compression stream's responses: each piece of output as it comes, then the totals.
  private func serveCompressionStream<Request: Sendable, Response: CompressionStreamResponse>(
    _ io: StreamIO<Request, Response>, open: (Request) throws -> StreamSession,
    chunk: @escaping @Sendable (Request) -> (data: Data, final: Bool)
  ) async throws {
    let writer = StallBoundedWriter(io.write, timeout: configuration.streamWriteTimeout)
    let s = try await runStream(io.next, open: open, chunk: chunk) { piece in
      var r = Response()
      r.data = piece
      try await writer.write(r)
    }
    var last = Response()
    last.final = true
    last.totalIn = s.totals.totalIn
    last.totalOut = s.totals.totalOut
    last.deviceNs = s.totals.deviceNanoseconds
    last.jobs = s.totals.jobs
    try await writer.write(last)
  }

  /// Runs one stream to its end and returns its session (for the totals).
  ///
  /// The first message opens the session. Then two sides run at once: one
  /// reads chunks and queues their slices (at most `StreamSession.readAhead`
  /// unfinished), the other waits for the slices in order and writes their
  /// output. So a chunk's output goes out as soon as the device has it, without
  /// waiting for the next chunk (a client may send a chunk and wait for its
  /// output), and a client that stops reading stops the reader too, once the
  /// read-ahead is full. The first error on either side ends the call.
  func runStream<Message: Sendable>(
    _ next: @escaping @Sendable () async throws -> Message?,
    open: (Message) throws -> StreamSession,
    chunk: @escaping @Sendable (Message) -> (data: Data, final: Bool),
    emit: @escaping @Sendable (Data) async throws -> Void
  ) async throws -> StreamSession {
    let reader = IdleBoundedReader(next, timeout: configuration.streamIdleTimeout)
    guard let first = try await reader.next() else {
      throw RequestError.invalidArgument("the stream carried no messages")
    }
    let session = try open(first)
    defer { session.close() }
    let (limits, firstChunk) = (configuration.requestLimits, chunk(first))
    try await withThrowingTaskGroup(of: Void.self) { group in
      group.addTask {
        var slices = session.makeReader()
        var ended = false
        var next: (data: Data, final: Bool)? = firstChunk
        while let (data, final) = next {
          guard !ended else { throw RequestError.invalidArgument("data after the final chunk") }
          try limits.check(payload: data.count)
          try await session.queue(data, final: final, reader: &slices)
          ended = final
          next = try await reader.next().map(chunk)
        }
        if !ended { try await session.queue(Data(), final: true, reader: &slices) }
        session.endOfInput()
      }
      group.addTask { try await session.writeOutput(emit: emit) }
      for try await _ in group {}
    }
    return session
  }
}

/// One open stream: its device context, its position and its totals.
///
/// Slices are read ahead: while one slice runs on the device the next one is
/// already queued (the dispatcher's chain for the stream keeps them in order and
/// one at a time), so the stream stays backlogged in the fair scheduler and can
/// claim its weight's share of device time. At most `readAhead` slices are
/// unfinished at once. `queue` runs on the reading side, `writeOutput` on the
/// writing side, concurrently.
final class StreamSession: Sendable {
  /// Slices queued or running at once: one on the device, one waiting behind it.
  static let readAhead = 2

  struct Slice: Sendable {
    let task: Task<JobResult, any Error>
    let input: Data
    let sequence: UInt64
    let final: Bool
  }

  struct Totals: Sendable {
    var totalIn: UInt64 = 0
    var totalOut: UInt64 = 0
    var deviceNanoseconds: UInt64 = 0
    var jobs: UInt32 = 0
  }

  let service: AcceleratorService
  let target: StreamTarget
  let algorithm: DeviceAlgorithm
  let level: UInt8
  let compress: Bool
  let tenant: String
  let deadline: CallDeadline
  let outputCap: UInt64
  private let totalsBox = Mutex(Totals())
  /// Slices not yet finished, oldest first (for `close`).
  private let running = Mutex<[Task<JobResult, any Error>]>([])
  private let closed = Atomic(false)
  /// Reading side to writing side: queued slices, in order.
  private let slices: AsyncStream<Slice>
  private let slicesIn: AsyncStream<Slice>.Continuation
  /// Writing side to reading side: one token per finished slice.
  private let finished: AsyncStream<Void>
  private let finishedIn: AsyncStream<Void>.Continuation
  /// The reading side's own state.
  struct Reader {
    fileprivate var nextSequence: UInt64 = 0
    fileprivate var unfinished = 0
    fileprivate var tokens: AsyncStream<Void>.Iterator
  }

  func makeReader() -> Reader { Reader(tokens: finished.makeAsyncIterator()) }

  var totals: Totals { totalsBox.withLock { $0 } }

  init(
    _ service: AcceleratorService, algorithm: DeviceAlgorithm, level: UInt8, compress: Bool, tenant: String,
    deadline: CallDeadline, outputCap: UInt64 = .max
  ) throws {
    self.service = service
    self.algorithm = algorithm
    self.level = level
    self.compress = compress
    self.tenant = tenant
    self.deadline = deadline
    self.outputCap = outputCap
    (slices, slicesIn) = AsyncStream.makeStream(of: Slice.self)
    (finished, finishedIn) = AsyncStream.makeStream(of: Void.self)
    let contextBytes = StreamContextMemory.bytes(algorithm: algorithm, level: level, compress: compress)
    do { target = try service.dispatcher.openStream(tenant: tenant, contextBytes: contextBytes) } catch {
      throw StatusMapping.callStatus(error, operation: compress ? "compress" : "decompress", outputLimit: 0)
    }
  }

  /// Ends the stream: slices still running are abandoned, waiting ones dropped,
  /// and the context goes back to its queue (once the device is done with it).
  func close() {
    guard !closed.exchange(true, ordering: .relaxed) else { return }
    slicesIn.finish()
    finishedIn.finish()
    for task in running.withLock({ $0 }) { task.cancel() }
    service.dispatcher.closeStream(target)
  }

  /// Reading side: queues one chunk as slices of at most `streamJobInput`,
  /// waiting while `readAhead` slices are unfinished or the tenant has no room.
  func queue(_ data: Data, final: Bool, reader: inout Reader) async throws {
    let size = AcceleratorService.streamJobInput
    var offset = data.startIndex
    repeat {
      let end = min(data.endIndex, offset + size)
      while reader.unfinished >= Self.readAhead {
        guard await reader.tokens.next() != nil else { throw CancellationError() }
        reader.unfinished -= 1
      }
      await service.dispatcher.waitForRoom(tenant: tenant)
      try Task.checkCancellation()
      let input = data.subdata(in: offset..<end)
      let last = final && end == data.endIndex
      let sequence = reader.nextSequence
      reader.nextSequence += 1
      reader.unfinished += 1
      slicesIn.yield(Slice(task: start(input, final: last, sequence: sequence, continuing: false), input: input, sequence: sequence, final: last))
      offset = end
    } while offset < data.endIndex
  }

  /// Reading side: no more chunks; the writing side ends after the last slice.
  func endOfInput() { slicesIn.finish() }

  /// Queues one device job for the stream; the dispatcher runs it when its turn in the chain comes.
  private func start(_ input: Data, final: Bool, sequence: UInt64, continuing: Bool) -> Task<JobResult, any Error> {
    var step = DeviceStep(compress ? .compress : .decompress, algorithm, level: level)
    step.streamSlot = target.slot
    step.streamStart = sequence == 0 && !continuing
    step.streamFinal = final
    let totalOut = totalsBox.withLock { $0.totalOut }
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
    let task = Task { try await service.run(job, operation: operation, outputLimit: outputLimit, deadline: deadline) }
    running.withLock { $0.append(task) }
    return task
  }

  /// Writing side: waits for each slice in order, emits its output, and
  /// continues it (same sequence, ahead of the slice queued behind it) while
  /// the device reports that its output buffer filled up first.
  func writeOutput(emit: (Data) async throws -> Void) async throws {
    for await slice in slices {
      var input = slice.input
      var task = slice.task
      while true {
        // Cancelled (the other side failed): the slice is abandoned rather than waited for.
        let result = try await withTaskCancellationHandler { try await task.value } onCancel: { [task] in task.cancel() }
        running.withLock { r in r.removeAll { $0 == task } }
        let total = totalsBox.withLock { t -> UInt64 in
          t.jobs += 1
          t.totalIn += UInt64(result.consumed)
          t.totalOut += UInt64(result.output.count)
          t.deviceNanoseconds += result.stats.deviceNanoseconds
          return t.totalOut
        }
        if total > outputCap {
          throw CallStatus(
            code: .resourceExhausted,
            message: "\(compress ? "compress" : "decompress"): output exceeds the limit of \(outputCap) bytes")
        }
        if !result.output.isEmpty { try await emit(result.output) }
        guard result.moreOutput else { break }
        input = result.consumed >= input.count ? Data() : input.subdata(in: input.startIndex + result.consumed..<input.endIndex)
        task = start(input, final: slice.final, sequence: slice.sequence, continuing: true)
      }
      finishedIn.yield()
    }
    try Task.checkCancellation()
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
  let writer: @Sendable (Message) async throws -> Void
  let timeout: Duration

  init(_ writer: @escaping @Sendable (Message) async throws -> Void, timeout: Duration) {
    self.writer = writer
    self.timeout = timeout
  }

  func write(_ message: Message) async throws {
    let (writer, timeout) = (writer, timeout)
    try await TimeLimit.run(
      timeout,
      expired: {
        CallStatus(
          code: .resourceExhausted,
          message: "the client accepted no stream output for \(timeout) (stream write timeout); the stream was ended")
      },
      { try await writer(message) })
  }
}

/// A stream's request side that gives up on a client that sends nothing.
///
/// An open compression stream holds a device stream context and memory, so a
/// client that opens one and goes quiet would hold them for as long as it
/// likes. A message that does not arrive within `timeout` (nil: no limit) ends
/// the call with RESOURCE_EXHAUSTED. Only one task reads at a time.
struct IdleBoundedReader<Message: Sendable>: Sendable {
  let source: @Sendable () async throws -> Message?
  let timeout: Duration?

  init(_ source: @escaping @Sendable () async throws -> Message?, timeout: Duration?) {
    self.source = source
    self.timeout = timeout
  }

  func next() async throws -> Message? {
    guard let timeout else { return try await source() }
    return try await TimeLimit.run(
      timeout,
      expired: {
        CallStatus(
          code: .resourceExhausted,
          message: "no stream input for \(timeout) (stream idle timeout); the stream was ended and its device context freed")
      },
      { try await self.source() })
  }
}

/// What CompressStream and DecompressStream answer alike: output pieces, then the totals.
protocol CompressionStreamResponse: SwiftProtobuf.Message, Sendable {
  var data: Data { get set }
  var final: Bool { get set }
  var totalIn: UInt64 { get set }
  var totalOut: UInt64 { get set }
  var deviceNs: UInt64 { get set }
  var jobs: UInt32 { get set }
}

extension Accelgate_V1_CompressStreamResponse: CompressionStreamResponse {}
extension Accelgate_V1_DecompressStreamResponse: CompressionStreamResponse {}
