internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import AccelMessages
internal import Synchronization

/// `grpc.health.v1.Health`: SERVING while the device is attached and healthy and
/// the server is not draining; NOT_SERVING otherwise. The overall status ("")
/// and `accelgate.v1.Accelerator` follow the same rule.
struct HealthService: Sendable {
  let dispatcher: Dispatcher
  let device: EmulatedDevice?
  let draining: Draining

  static let services: Set<String> = ["", "accelgate.v1.Accelerator"]
  /// How often Watch re-evaluates the status.
  static let watchInterval: Duration = .milliseconds(100)

  var status: Grpc_Health_V1_HealthCheckResponse.ServingStatus {
    let healthy =
      !draining.isDraining && dispatcher.isAttached && (device?.isRunning ?? true)
      && dispatcher.driver.queues.contains(where: \.isHealthy)
    return healthy ? .serving : .notServing
  }

  /// One Watch: the status now, then each change, until `cancelled`.
  func watch(
    _ service: String, write: (Grpc_Health_V1_HealthCheckResponse) async throws -> Void, cancelled: () -> Bool
  ) async throws {
    var last: Grpc_Health_V1_HealthCheckResponse.ServingStatus?
    while true {
      // On SIGTERM the transport cancels every RPC; the status is evaluated once
      // more first, so watchers see NOT_SERVING before their stream ends.
      let now = Self.services.contains(service) ? status : .serviceUnknown
      if now != last {
        var r = Grpc_Health_V1_HealthCheckResponse()
        r.status = now
        try await write(r)
        last = now
      }
      if Task.isCancelled || cancelled() { return }
      try? await Task.sleep(for: Self.watchInterval)
    }
  }
}

/// Set when the server starts draining (SIGTERM): health turns NOT_SERVING first.
final class Draining: Sendable {
  private let flag = Atomic<Bool>(false)
  var isDraining: Bool { flag.load(ordering: .relaxed) }
  func begin() { flag.store(true, ordering: .relaxed) }
}
