internal import Foundation
internal import Logging

/// Counts every finished call (`accelgate_requests_total`,
/// `accelgate_request_duration_seconds`) and writes its access-log line, with
/// its request id: debug for OK, info otherwise. The edge calls it once per
/// call, when the call's status is sent; streams are timed to their end.
enum AccessLog {
  /// Counts one finished call and writes its access-log line (debug for OK, info otherwise).
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
}
