internal import AccelCoreEdge
internal import AccelDispatcher
internal import AccelMessages
internal import AccelProto
internal import AccelScheduler
internal import AccelRequests
internal import FoundationEssentials
internal import GRPCCore
internal import SwiftProtobuf

/// The public API on gRPC's C core (issue 18, first part): the unary job
/// calls and health Check, answered from the completion-queue thread that
/// receives them and from the reaper that completes their jobs, with no
/// Swift task on the way. The same translator (AccelRequests) and the same
/// status mapping as the grpc-swift edge, so a request gets the same answer
/// on either. Methods not yet served here end UNIMPLEMENTED, naming the edge.
struct CoreEdgeService: Sendable {
  let service: AcceleratorService
  let directory: TenantDirectory
  let health: HealthService
  let metrics: GatewayMetrics

  static let accelerator = "/accelgate.v1.Accelerator/"

  /// Registered methods and their handlers.
  var methods: [(path: String, handler: CoreServer.Handler)] {
    [
      ("/grpc.health.v1.Health/Check", { self.check($0) }),
      (Self.accelerator + "Compress", { call in self.unary(call, "Compress", Accelgate_V1_CompressRequest.self) { r, t in
        let plan = try service.translator.compress(r, tenant: t)
        return (plan, plan.compressResponse, .raw)
      } }),
      (Self.accelerator + "Decompress", { call in self.unary(call, "Decompress", Accelgate_V1_DecompressRequest.self) { r, t in
        let plan = try service.translator.decompress(r, tenant: t)
        return (plan, plan.decompressResponse, .raw)
      } }),
      (Self.accelerator + "Encrypt", { call in self.unary(call, "Encrypt", Accelgate_V1_EncryptRequest.self) { r, t in
        let plan = try service.translator.encrypt(r, tenant: t)
        return (plan.plan, { res in plan.response(res).message }, plan.key)
      } }),
      (Self.accelerator + "Decrypt", { call in self.unary(call, "Decrypt", Accelgate_V1_DecryptRequest.self) { r, t in
        let plan = try service.translator.decrypt(r, tenant: t)
        return (plan.plan, { res in plan.response(res) }, plan.key)
      } }),
      (Self.accelerator + "Digest", { call in self.unary(call, "Digest", Accelgate_V1_DigestRequest.self) { r, t in
        let plan = try service.translator.digest(r, tenant: t)
        return (plan.plan, { res in plan.response(res) }, plan.key)
      } }),
    ]
  }

  /// Every other path: a method of the API this edge does not serve yet, or no method at all.
  func unregistered(_ call: CoreCall) {
    let path = call.path
    let api = Accelgate_V1_Accelerator.Method.descriptors + Grpc_Health_V1_Health.Method.descriptors
    let known = api.contains { (d: MethodDescriptor) in "/\(d.fullyQualifiedMethod)" == path } || path.hasPrefix("/grpc.reflection.")
    call.fail(
      code: RPCError.Code.unimplemented.rawValue,
      message: known ? "\(path) is not served on the C-core edge yet; call the main port" : "unknown method \(path)")
  }

  // MARK: health

  private func check(_ call: CoreCall) {
    let start = ContinuousClock.now
    guard let request: Grpc_Health_V1_HealthCheckRequest = try? Self.decode(call) else {
      return finish(call, "Check", "", start, RPCError(code: .invalidArgument, message: "the request is not a HealthCheckRequest"))
    }
    guard HealthService.services.contains(request.service) else {
      return finish(call, "Check", "", start, RPCError(code: .notFound, message: "unknown service '\(request.service)'"))
    }
    var response = Grpc_Health_V1_HealthCheckResponse()
    response.status = health.status
    answer(call, "Check", "", start, response)
  }

  // MARK: unary jobs

  /// A job call: authenticate, decode, translate, submit; answer from the job's completion.
  private func unary<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
    _ call: CoreCall, _ method: String, _ type: Request.Type,
    _ translate: @escaping (Request, String) throws -> (JobPlan, @Sendable (JobResult) -> Response, KeyIdentity)
  ) {
    let start = ContinuousClock.now
    guard let tenant = directory.authenticate(authorization: call.metadata("authorization"))?.id else {
      metrics.recordUnauthenticated()
      let missing = call.metadata("authorization") == nil
      return finish(call, method, "", start, RPCError(
        code: .unauthenticated, message: missing ? "missing 'authorization: Bearer <api-key>' metadata" : "unknown API key"))
    }
    let request: Request
    do { request = try Self.decode(call) } catch {
      return finish(call, method, tenant, start, RPCError(code: .internalError, message: "could not parse the request: \(error)"))
    }
    let plan: JobPlan
    let respond: @Sendable (JobResult) -> Response
    let key: KeyIdentity
    do { (plan, respond, key) = try translate(request, tenant) } catch {
      return finish(call, method, tenant, start, StatusMapping.rpcError(any: error))
    }
    var job = plan.job
    let deadline = call.timeRemaining.map { ContinuousClock.now + $0 }
    job.deadline = deadline
    let id = service.dispatcher.makeJobID()
    let (dispatcher, translator, operation) = (service.dispatcher, service.translator, plan.operation)
    call.onCancel {
      let passed = deadline.map { ContinuousClock.now >= $0 - CallDeadline.tolerance } ?? false
      dispatcher.cancel(id: id, reason: passed ? .deadlineExceeded : .cancelled)
    }
    dispatcher.submit(job, id: id) { [self] outcome in
      translator.recordOutcome(key, tenant: tenant, operation: operation.auditName, ok: (try? outcome.get()) != nil)
      switch outcome {
      case .success(let result):
        answer(call, method, tenant, start, respond(result))
      case .failure(let error):
        finish(call, method, tenant, start,
          StatusMapping.rpcError(error, operation: operation.rawValue, outputLimit: plan.outputLimit))
      }
    }
  }

  // MARK: answers

  private func answer(_ call: CoreCall, _ method: String, _ tenant: String, _ start: ContinuousClock.Instant, _ message: some SwiftProtobuf.Message) {
    let bytes: [UInt8]
    do { bytes = try message.serializedBytes() } catch {
      return finish(call, method, tenant, start, RPCError(code: .internalError, message: "could not encode the response"))
    }
    metrics.recordCall(method: method, code: "OK", tenant: tenant, duration: .now - start)
    call.respond([.copy(bytes)], initial: [("x-request-id", Self.requestID(call))])
  }

  private func finish(_ call: CoreCall, _ method: String, _ tenant: String, _ start: ContinuousClock.Instant, _ error: RPCError) {
    metrics.recordCall(method: method, code: MetricsInterceptor.name(error.code), tenant: tenant, duration: .now - start)
    var trailers: [(String, String)] = [("x-request-id", Self.requestID(call))]
    for (key, value) in error.metadata {
      if case .string(let s) = value { trailers.append((key, s)) }
    }
    call.fail(code: error.code.rawValue, message: error.message, trailers: trailers)
  }

  /// Decodes the request straight from the core's bytes (valid for the call's life; decoding copies what it keeps).
  static func decode<M: SwiftProtobuf.Message>(_ call: CoreCall) throws -> M {
    let payload = call.payload
    guard let base = payload.baseAddress, payload.count > 0 else { return M() }
    return try M(serializedBytes: Data(bytesNoCopy: UnsafeMutableRawPointer(mutating: base), count: payload.count, deallocator: .none))
  }

  static func requestID(_ call: CoreCall) -> String {
    RequestID.from(traceparent: call.metadata("traceparent"), requestID: call.metadata("x-request-id"))
  }
}
