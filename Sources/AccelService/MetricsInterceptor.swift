internal import GRPCCore

/// Counts every call's final status and duration (`accelgate_requests_total`,
/// `accelgate_request_duration_seconds`). It runs after `AuthInterceptor`, so it
/// sees the authenticated tenant; streaming responses are timed to their end.
struct MetricsInterceptor: ServerInterceptor {
  let metrics: GatewayMetrics

  func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let start = ContinuousClock.now
    let method = context.descriptor.method
    let tenant =
      context.descriptor.service.fullyQualifiedService.hasPrefix("grpc.") ? "" : TenantHeader.tenant(of: request.metadata)
    let metrics = self.metrics
    @Sendable func record(_ code: String) {
      metrics.recordCall(method: method, code: code, tenant: tenant, duration: ContinuousClock.now - start)
    }
    var response: StreamingServerResponse<Output>
    do {
      response = try await next(request, context)
    } catch {
      record(Self.code(of: error))
      throw error
    }
    switch response.accepted {
    case .success(var contents):
      let producer = contents.producer
      contents.producer = { writer in
        do {
          let trailers = try await producer(writer)
          record("OK")
          return trailers
        } catch {
          record(Self.code(of: error))
          throw error
        }
      }
      response.accepted = .success(contents)
    case .failure(let error):
      record(Self.name(error.code))
    }
    return response
  }

  static func code(of error: any Error) -> String {
    if let e = error as? RPCError { return name(e.code) }
    if let e = error as? any RPCErrorConvertible { return name(e.rpcErrorCode) }
    return "UNKNOWN"
  }

  /// The canonical upper-case name, as gRPC's own status table spells it.
  static func name(_ code: RPCError.Code) -> String {
    let names = [
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
      "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
      "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    ]
    return code.rawValue >= 0 && code.rawValue < names.count ? names[code.rawValue] : "UNKNOWN"
  }
}
