internal import Foundation
internal import GRPCCore
internal import Logging

/// Observes every call: counts its final status and duration
/// (`accelgate_requests_total`, `accelgate_request_duration_seconds`) and writes
/// one access-log line with a request id (debug for OK, info otherwise). It runs
/// after `AuthInterceptor`, so it sees the authenticated tenant; streaming
/// responses are timed to their end.
///
/// The request id is the W3C `traceparent` trace id when the caller sends one,
/// else a valid `x-request-id` from the caller, else a random one. It is returned
/// in the `x-request-id` response header and is available to handlers as
/// `RequestID.current`.
struct MetricsInterceptor: ServerInterceptor {
  let metrics: GatewayMetrics
  var logger: Logger = Logger(label: "accelgate.calls")

  func intercept<Input: Sendable, Output: Sendable>(
    request: StreamingServerRequest<Input>,
    context: ServerContext,
    next: @Sendable (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
  ) async throws -> StreamingServerResponse<Output> {
    let start = ContinuousClock.now
    let method = context.descriptor.method
    let tenant =
      context.descriptor.service.fullyQualifiedService.hasPrefix("grpc.") ? "" : TenantHeader.tenant(of: request.metadata)
    let (metrics, logger) = (self.metrics, self.logger)
    let id = RequestID.from(request.metadata)
    @Sendable func record(_ code: String) {
      Self.record(metrics: metrics, logger: logger, method: method, tenant: tenant, id: id, code: code, start: start)
    }
    var response: StreamingServerResponse<Output>
    do {
      response = try await RequestID.$current.withValue(id) { try await next(request, context) }
    } catch {
      record(Self.code(of: error))
      // A typed refusal (any RPCErrorConvertible, such as RequestError) gets its status here, so it carries the id too.
      if var e = (error as? RPCError) ?? (error as? any RPCErrorConvertible).map({ RPCError($0) }) {
        e.metadata.addString(id, forKey: "x-request-id")
        throw e
      }
      throw error
    }
    switch response.accepted {
    case .success(var contents):
      contents.metadata.addString(id, forKey: "x-request-id")
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
    case .failure(var error):
      record(Self.name(error.code))
      error.metadata.addString(id, forKey: "x-request-id")
      response.accepted = .failure(error)
    }
    return response
  }

  /// Counts one finished call and writes its access-log line (debug for OK, info otherwise); every edge calls this.
  static func record(
    metrics: GatewayMetrics, logger: Logger, method: String, tenant: String, id: String, code: String,
    start: ContinuousClock.Instant
  ) {
    let elapsed = ContinuousClock.now - start
    metrics.recordCall(method: method, code: code, tenant: tenant, duration: elapsed)
    let ms = Double(elapsed.components.seconds) * 1e3 + Double(elapsed.components.attoseconds) / 1e15
    logger.log(
      level: code == "OK" ? .debug : .info, "call",
      metadata: [
        "request_id": "\(id)", "method": "\(method)", "tenant": "\(tenant)", "code": "\(code)",
        "duration_ms": "\(String(format: "%.3f", ms))",
      ])
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

/// The id of the call being served (see `MetricsInterceptor`).
enum RequestID {
  @TaskLocal static var current: String = ""

  /// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
  /// else a caller's `x-request-id` of 1–64 safe characters, else 16 random hex digits.
  static func from(_ metadata: Metadata) -> String {
    from(
      traceparent: metadata[stringValues: "traceparent"].first(where: { _ in true }),
      requestID: metadata[stringValues: "x-request-id"].first(where: { _ in true }))
  }

  /// The same from the two header values, whichever edge read them.
  static func from(traceparent: String?, requestID: String?) -> String {
    if let tp = traceparent {
      let parts = tp.split(separator: "-")
      if parts.count == 4, parts[0].count == 2, parts[1].count == 32, parts[2].count == 16, parts[3].count == 2,
        parts.allSatisfy({ $0.allSatisfy(\.isHexDigit) }), parts[1] != String(repeating: "0", count: 32), parts[0] != "ff"
      {
        return parts[1].lowercased()
      }
    }
    if let given = requestID, (1...64).contains(given.count),
      given.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) })
    {
      return given
    }
    let hex = String(UInt64.random(in: 0...UInt64.max), radix: 16)
    return String(repeating: "0", count: 16 - hex.count) + hex
  }
}
