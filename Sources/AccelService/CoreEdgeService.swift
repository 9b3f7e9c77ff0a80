internal import AccelCoreEdge
internal import AccelDispatcher
internal import AccelDriver
internal import CAccelCrypto
internal import AccelMessages
internal import AccelScheduler
internal import AccelRequests
internal import FoundationEssentials
internal import Logging
internal import SwiftProtobuf

/// The public API on gRPC's C core (issue 18).
///
/// - Unary job calls are answered from the completion-queue thread that
///   receives them and from the reaper that completes their jobs, with no Swift
///   task on the way.
/// - Streams (CompressStream, DecompressStream, Submit, health Watch,
///   reflection) run their bodies over `StreamIO`, in a task that awaits each
///   message and each write.
///
/// Requests become jobs in the translator (AccelRequests), failures become
/// statuses in `StatusMapping`, and every call ends with one `AccessLog` line.
struct CoreEdgeService: Sendable {
  let service: AcceleratorService
  let directory: TenantDirectory
  let health: HealthService
  let reflection: ReflectionService
  let metrics: GatewayMetrics
  let logger: Logger
  /// Pool bytes each tenant's replies hold while the core sends them in place.
  let pins: ReplyPins

  static let accelerator = "/accelgate.v1.Accelerator/"

  /// Registered methods and their handlers. Health and reflection need no API
  /// key (they carry no tenant data); every `accelgate.v1` method does.
  var methods: [CoreServer.Method] {
    [
      .init("/grpc.health.v1.Health/Check") { self.check($0) },
      .init("/grpc.health.v1.Health/Watch", .streaming) { self.watch($0) },
      .init("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", .streaming) { self.reflect($0) },
      .init("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", .streaming) { self.reflect($0) },
      .init(Self.accelerator + "DescribeDevice") { self.describeDevice($0) },
      .init(Self.accelerator + "Compress") { call in
        self.unary(call, "Compress", lane: laneField(NetworkLane.compressData)) {
          (r: Accelgate_V1_CompressRequest, t, lane) in
          let spans = try service.localSpans(
            input: r.inputRegionIfSet, output: r.outputRegionIfSet,
            inline: lane.payloadCount(inline: r.data), tenant: t, operation: "compress", outputLimit: Int(UInt32.max))
          let plan = try service.translator.compress(r, tenant: t, lane: lane, spans: spans.lengths)
          return UnaryPlan(plan: plan, key: .raw, spans: spans) { res in
            var message = plan.compressResponse(res)
            if spans.output != nil { message.regionOutputLength = res.stats.outputBytes }
            return (LaneResponse(message: message, pooled: res.pooledOutput), 0)
          }
        }
      },
      .init(Self.accelerator + "Decompress") { call in
        self.unary(call, "Decompress", lane: laneField(NetworkLane.decompressData)) {
          (r: Accelgate_V1_DecompressRequest, t, lane) in
          // The request is checked before its spans are bound (a bad format is refused as such).
          var plan = try service.translator.decompress(r, tenant: t, lane: lane)
          let spans = try service.localSpans(
            input: r.inputRegionIfSet, output: r.outputRegionIfSet,
            inline: lane.payloadCount(inline: r.data), tenant: t, operation: "decompress",
            outputLimit: plan.job.outputCapacity)
          if let output = spans.lengths.output { plan.outputLimit = output }
          return UnaryPlan(plan: plan, key: .raw, spans: spans) { [plan] res in
            var message = plan.decompressResponse(res)
            if spans.output != nil { message.regionOutputLength = res.stats.outputBytes }
            return (LaneResponse(message: message, pooled: res.pooledOutput), 0)
          }
        }
      },
      .init(Self.accelerator + "Encrypt") { call in
        self.unary(call, "Encrypt", lane: laneField(NetworkLane.encryptPlaintext, sensitive: true, carriesKey: true)) {
          (r: Accelgate_V1_EncryptRequest, t, lane) in
          let spans = try service.localSpans(
            input: r.inputRegionIfSet, output: r.outputRegionIfSet,
            inline: lane.payloadCount(inline: r.plaintext), tenant: t, operation: "encrypt", outputLimit: Int(UInt32.max))
          let plan = try service.translator.encrypt(r, tenant: t, lane: lane, spans: spans.lengths)
          return UnaryPlan(plan: plan.plan, key: plan.key, spans: spans) { res in
            var (message, prefix, extra) = plan.response(res)
            if spans.output != nil { message.regionOutputLength = res.stats.outputBytes }
            return (LaneResponse(message: message, pooled: res.pooledOutput, prefix: prefix), extra)
          }
        }
      },
      .init(Self.accelerator + "Decrypt") { call in
        self.unary(call, "Decrypt", lane: laneField(NetworkLane.decryptCiphertext, sealed: true, carriesKey: true)) {
          (r: Accelgate_V1_DecryptRequest, t, lane) in
          let spans = try service.localSpans(
            input: r.inputRegionIfSet, output: r.outputRegionIfSet,
            inline: lane.payloadCount(inline: r.ciphertext), tenant: t, operation: "decrypt",
            outputLimit: service.configuration.maxDecompressedBytes)
          let plan = try service.translator.decrypt(r, tenant: t, lane: lane, spans: spans.lengths)
          return UnaryPlan(plan: plan.plan, key: plan.key, spans: spans) { res in
            var message = plan.response(res)
            if spans.output != nil { message.regionOutputLength = res.stats.outputBytes }
            return (LaneResponse(message: message, pooled: res.pooledOutput), 0)
          }
        }
      },
      .init(Self.accelerator + "Digest") { call in
        self.unary(call, "Digest", lane: nil) { (r: Accelgate_V1_DigestRequest, t, _) in
          _ = try JobTranslator.digestAlgorithm(r.algorithm)  // refused as such before any span is bound
          let spans = try service.localSpans(
            input: r.hasInputRegion ? r.inputRegion : nil, output: nil, inline: r.data.count, tenant: t,
            operation: "digest", outputLimit: 0)
          let plan = try service.translator.digest(r, tenant: t, spans: spans.lengths)
          return UnaryPlan(plan: plan.plan, key: plan.key, spans: spans) { res in (LaneResponse(message: plan.response(res)), 0) }
        }
      },
      .init(Self.accelerator + "CompressStream", .streaming) { call in
        self.stream(call, "CompressStream") { io, tenant, deadline in
          try await service.compressStream(io, tenant: tenant, deadline: deadline)
        }
      },
      .init(Self.accelerator + "DecompressStream", .streaming) { call in
        self.stream(call, "DecompressStream") { io, tenant, deadline in
          try await service.decompressStream(io, tenant: tenant, deadline: deadline)
        }
      },
      .init(Self.accelerator + "Submit", .streaming) { call in
        self.stream(call, "Submit") { io, tenant, deadline in
          try await service.submit(io, tenant: tenant, deadline: deadline)
        }
      },
    ]
  }

  /// Every other path: no method of this server.
  func unregistered(_ call: CoreCall) {
    let arrival = Arrival(call, method: String(call.path.split(separator: "/").last ?? ""))
    finish(arrival, CallStatus(code: .unimplemented, message: "unknown method \(call.path)"))
  }

  // MARK: health, reflection, description

  private func check(_ call: CoreCall) {
    let arrival = Arrival(call, method: "Check")
    guard let request: Grpc_Health_V1_HealthCheckRequest = try? Self.decode(call.payload) else {
      return finish(arrival, CallStatus(code: .invalidArgument, message: "the request is not a HealthCheckRequest"))
    }
    guard HealthService.services.contains(request.service) else {
      return finish(arrival, CallStatus(code: .notFound, message: "unknown service '\(request.service)'"))
    }
    var response = Grpc_Health_V1_HealthCheckResponse()
    response.status = health.status
    answer(arrival, response)
  }

  private func watch(_ call: CoreCall) {
    stream(call, "Watch", authenticated: false) {
      (io: StreamIO<Grpc_Health_V1_HealthCheckRequest, Grpc_Health_V1_HealthCheckResponse>, _, _) in
      guard let request = try await io.next() else {
        throw CallStatus(code: .invalidArgument, message: "Watch carried no request")
      }
      // Draining: the watcher sees NOT_SERVING, then its stream ends (it would hold the drain otherwise).
      try await health.watch(request.service, write: io.write, cancelled: { health.draining.isDraining })
    }
  }

  private func reflect(_ call: CoreCall) {
    stream(call, "ServerReflectionInfo", authenticated: false) {
      (io: StreamIO<Grpc_Reflection_V1_ServerReflectionRequest, Grpc_Reflection_V1_ServerReflectionResponse>, _, _) in
      while let request = try await io.next() { try await io.write(reflection.index.answer(request)) }
    }
  }

  private func describeDevice(_ call: CoreCall) {
    var arrival = Arrival(call, method: "DescribeDevice")
    guard authenticate(&arrival) else { return }
    guard (try? Self.decode(call.payload) as Accelgate_V1_DescribeDeviceRequest) != nil else {
      return finish(arrival, Self.unparsable(Accelgate_V1_DescribeDeviceRequest.self))
    }
    answer(arrival, service.describeDevice(tenant: arrival.tenant))
  }

  // MARK: unary jobs

  /// What translating a unary job call gives the edge.
  struct UnaryPlan<Response: SwiftProtobuf.Message & Sendable>: Sendable {
    let plan: JobPlan
    let key: KeyIdentity
    /// The local lane's spans of client memory the job reads or writes (none on TCP).
    let spans: LocalSpans
    /// The response, with the result still in the pool when the lane left it there, and copies made on the way.
    let respond: @Sendable (JobResult) -> (LaneResponse<Response>, extraCopies: UInt32)
  }

  /// Where a method's payload field is, for staging it in the device pool (the network lane).
  struct LaneField: Sendable {
    let field: UInt32
    let maxPayload: Int
    /// Plaintext: the staged buffer and the copy of the other fields are zeroed when freed.
    let sensitive: Bool
    /// The other fields may hold a raw key: their copy is zeroed after decoding.
    let carriesKey: Bool
  }

  private func laneField(_ field: UInt32, sensitive: Bool = false, sealed: Bool = false, carriesKey: Bool = false) -> LaneField? {
    let c = service.configuration
    guard c.pooledPayloads else { return nil }
    return LaneField(
      field: field, maxPayload: sealed ? c.requestLimits.sealedLimit : c.maxRequestBytes, sensitive: sensitive,
      carriesKey: carriesKey)
  }

  /// A job call: authenticate, decode (staging the payload in the pool), translate, submit; answer from the job's completion.
  private func unary<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message & Sendable>(
    _ call: CoreCall, _ method: String, lane field: LaneField?,
    _ translate: (Request, String, PayloadLane) throws -> UnaryPlan<Response>
  ) {
    var arrival = Arrival(call, method: method)
    guard authenticate(&arrival) else { return }
    let (tenant, arrived) = (arrival.tenant, arrival)
    let request: Request
    let staged: StagedInput?
    do { (request, staged) = try decode(call, tenant: tenant, lane: field) } catch {
      return finish(arrival, Self.unparsable(Request.self))
    }
    let lane: PayloadLane = field == nil ? .copied : .pooled(staged)
    let unary: UnaryPlan<Response>
    do { unary = try translate(request, tenant, lane) } catch {
      return finish(arrival, StatusMapping.callStatus(any: error))
    }
    let plan = unary.plan
    var job = plan.job
    unary.spans.apply(to: &job)
    let deadline = call.timeRemaining.map { ContinuousClock.now + $0 }
    job.deadline = deadline
    let id = service.dispatcher.makeJobID()
    let (dispatcher, translator, operation, key) = (service.dispatcher, service.translator, plan.operation, unary.key)
    call.onCancel {
      let passed = deadline.map { ContinuousClock.now >= $0 - CallDeadline.tolerance } ?? false
      dispatcher.cancel(id: id, reason: passed ? .deadlineExceeded : .cancelled)
    }
    dispatcher.submit(job, id: id) { [self] outcome in
      translator.recordOutcome(key, tenant: tenant, operation: operation.auditName, ok: (try? outcome.get()) != nil)
      switch outcome {
      case .success(let result):
        completed(result, unary, arrived, lane: lane)
      case .failure(let error):
        finish(arrived, StatusMapping.callStatus(error, operation: operation.rawValue, outputLimit: plan.outputLimit))
      }
    }
  }

  /// A job's result: its copies counted, and its response sent (from the pool in place, when it fits the tenant's pins).
  private func completed<Response: SwiftProtobuf.Message & Sendable>(
    _ result: JobResult, _ unary: UnaryPlan<Response>, _ arrival: Arrival, lane: PayloadLane
  ) {
    let (response, extra) = unary.respond(result)
    let held = response.pooled?.count ?? 0
    let (pins, tenant, call, metrics) = (self.pins, arrival.tenant, arrival.call, self.metrics)
    // In place unless the tenant's unsent replies hold too much of the pool already; a
    // reply the client does not take within the write timeout ends its call (`ReplyWatchdog`).
    let end: @Sendable () -> Void = {
      metrics.recordReplyTimeout(tenant: tenant)
      call.cancel()
    }
    let ticket: UInt64? = held > 0 ? pins.take(held, tenant: tenant, now: .now, end: end) : nil
    service.recordCopies(
      tenant: tenant, operation: unary.plan.operation.rawValue, lane: lane, spans: unary.spans,
      result: result, extraOut: extra, sentInPlace: ticket != nil)
    var sent: (@Sendable () -> Void)?
    if let ticket { sent = { pins.give(ticket) } }
    answer(arrival, response, sent: sent)
  }

  /// Decodes a request straight from the core's bytes; with a lane field, its
  /// payload is staged in a device pool first (`NetworkLane.decode`), found
  /// and copied across the core's slices.
  private func decode<Request: SwiftProtobuf.Message & Sendable>(
    _ call: CoreCall, tenant: String, lane field: LaneField?
  ) throws -> (Request, StagedInput?) {
    guard let field else { return (try Self.decode(call.payload), nil) }
    // Scanned in the core's slices, so a message in several is not gathered first (one copy in, not two).
    let slices = call.payloadSlices.map(SlicedBytes.init) ?? SlicedBytes(call.payload)
    let decoded: LaneRequest<Request> = try NetworkLane(dispatcher: service.dispatcher, metrics: metrics).decode(
      slices, whole: { call.payload }, field: field.field, maxPayload: field.maxPayload, sensitive: field.sensitive,
      carriesKey: field.carriesKey, tenant: tenant)
    return (decoded.message, decoded.staged)
  }

  // MARK: streams

  /// A streaming call: its body runs in a task of its own, reading and
  /// writing through `StreamIO`, and the client's cancellation (or its
  /// deadline) cancels that task.
  private func stream<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
    _ call: CoreCall, _ method: String, authenticated: Bool = true,
    _ body: @escaping @Sendable (StreamIO<Request, Response>, String, CallDeadline) async throws -> Void
  ) {
    var arrival = Arrival(call, method: method)
    if authenticated { guard authenticate(&arrival) else { return } }
    let deadline = CallDeadline(instant: call.timeRemaining.map { ContinuousClock.now + $0 })
    let initial = [("x-request-id", arrival.id)]
    let io = StreamIO<Request, Response>(
      next: {
        try await call.next { bytes in
          do { return try Self.decode(bytes) as Request } catch { throw Self.unparsable(Request.self) }
        }
      },
      write: { message in try await call.write([(try message.serializedBytes() as CoreBuffer).part], initial: initial) })
    let (tenant, arrived) = (arrival.tenant, arrival)
    let task = Task {
      do {
        try await body(io, tenant, deadline)
        AccessLog.record(
          metrics: metrics, logger: logger, method: method, tenant: tenant, id: arrived.id, code: "OK",
          start: arrived.start)
        call.end(initial: initial)
      } catch {
        finish(arrived, Self.status(of: error, deadline: deadline))
      }
    }
    call.onCancel { task.cancel() }
  }

  /// The status a stream body's error ends its call with.
  static func status(of error: any Error, deadline: CallDeadline) -> CallStatus {
    switch error {
    case is CancellationError, is CoreCall.Ended: AcceleratorService.streamEnded(deadline)
    case let e as CallStatus: e
    case is RequestError, is KeyError, is LocalLaneError: StatusMapping.callStatus(any: error)
    default: CallStatus(code: .unknown, message: "Service method threw an unknown error.")
    }
  }

  // MARK: answers

  /// What the edge knows of a call from its arrival.
  struct Arrival: Sendable {
    let call: CoreCall
    let method: String
    var tenant = ""
    let id: String
    let start = ContinuousClock.now

    init(_ call: CoreCall, method: String) {
      self.call = call
      self.method = method
      id = RequestID.from(traceparent: call.metadata("traceparent"), requestID: call.metadata("x-request-id"))
    }
  }

  /// Finds the tenant of the call's API key, or ends the call UNAUTHENTICATED.
  private func authenticate(_ arrival: inout Arrival) -> Bool {
    let authorization = arrival.call.metadata("authorization")
    guard let tenant = directory.authenticate(authorization: authorization)?.id else {
      metrics.recordUnauthenticated()
      finish(arrival, CallStatus(
        code: .unauthenticated,
        message: authorization == nil ? "missing 'authorization: Bearer <api-key>' metadata" : "unknown API key"))
      return false
    }
    arrival.tenant = tenant
    return true
  }

  private func answer(_ arrival: Arrival, _ message: some SwiftProtobuf.Message) {
    answer(arrival, LaneResponse(message: message), sent: nil)
  }

  /// Sends a response: encoded straight into a buffer the core sends in
  /// place, with a result still in the pool sent from there (its lease is
  /// released when the core is done with the bytes).
  private func answer<M: SwiftProtobuf.Message>(
    _ arrival: Arrival, _ response: LaneResponse<M>, sent: (@Sendable () -> Void)?
  ) {
    let parts: [CorePart]
    do { parts = try Self.parts(response, sent: sent) } catch {
      response.pooled?.release()
      sent?()
      return finish(arrival, CallStatus(code: .internalError, message: "could not encode the response"))
    }
    record(arrival, "OK")
    arrival.call.respond(parts, initial: [("x-request-id", arrival.id)])
  }

  /// A response's message as parts: [payload field header and prefix, the
  /// pool's bytes, the other fields]. With `sent`, the pool's bytes go in
  /// place and `sent` runs after their lease is released; without it they are
  /// copied out and the lease is freed now.
  static func parts<M: SwiftProtobuf.Message>(_ response: LaneResponse<M>, sent: (@Sendable () -> Void)?) throws -> [CorePart] {
    guard let pooled = response.pooled, pooled.count > 0 else {
      response.pooled?.release()
      return [try response.message.serializedBytes() as CoreBuffer].map(\.part)
    }
    // The payload field first (field 1: where SwiftProtobuf, writing in field order, would put it).
    let rest: CoreBuffer = try response.message.serializedBytes()
    let length = response.prefix.count + pooled.count
    let tag = UInt64(NetworkLane.responsePayload) << 3 | UInt64(ProtoWire.lengthDelimited)
    var head = CoreBuffer(repeating: 0, count: ProtoWire.varintSize(tag) + ProtoWire.varintSize(UInt64(length)) + response.prefix.count)
    head.withUnsafeMutableBytes { out in
      var i = 0
      ProtoWire.writeVarint(tag, into: out, at: &i)
      ProtoWire.writeVarint(UInt64(length), into: out, at: &i)
      response.prefix.withUnsafeBytes { p in
        if let b = p.baseAddress, p.count > 0 { UnsafeMutableRawBufferPointer(rebasing: out[i...]).copyMemory(from: UnsafeRawBufferPointer(start: b, count: p.count)) }
      }
    }
    guard let sent else {
      defer { pooled.release() }
      var copy = CoreBuffer(repeating: 0, count: pooled.count)
      copy.withUnsafeMutableBytes { out in pooled.withBytes { out.copyMemory(from: $0) } }
      return [head.part, copy.part, rest.part]
    }
    let pool = CorePart.inPlace(pooled.bytesUntilRelease) {
      pooled.release()
      sent()
    }
    return [head.part, pool, rest.part]
  }

  private func finish(_ arrival: Arrival, _ error: CallStatus) {
    record(arrival, error.code.name)
    let trailers = [("x-request-id", arrival.id)] + error.trailers.map { ($0.key, $0.value) }
    arrival.call.fail(code: error.code.rawValue, message: error.message, trailers: trailers)
  }

  private func record(_ arrival: Arrival, _ code: String) {
    AccessLog.record(
      metrics: metrics, logger: logger, method: arrival.method, tenant: arrival.tenant, id: arrival.id, code: code,
      start: arrival.start)
  }

  /// Decodes a message straight from the core's bytes (decoding copies what it keeps).
  static func decode<M: SwiftProtobuf.Message>(_ payload: UnsafeRawBufferPointer) throws -> M {
    try NetworkLane.decodeWhole(payload)
  }

  /// The status of a message that is not the method's request type (grpc-swift's words).
  static func unparsable<M: SwiftProtobuf.Message>(_ type: M.Type) -> CallStatus {
    CallStatus(code: .invalidArgument, message: "Can't deserialize to message of type \(M.self).")
  }
}

extension CoreBuffer: SwiftProtobufContiguousBytes {}
