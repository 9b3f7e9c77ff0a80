internal import AccelABI
internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import AccelRequests
internal import AccelMessages
internal import FoundationEssentials
internal import AccelScheduler
internal import SwiftProtobuf

/// What the gateway's calls share: the dispatcher, the translator that turns
/// requests into jobs, and the local lane's regions. The edge (`CoreEdgeService`)
/// drives it; no device logic lives here.
struct AcceleratorService: Sendable {
  let dispatcher: Dispatcher
  let configuration: ServiceConfiguration
  let device: EmulatedDevice?
  let keyring: KeyringDirectory
  let nonceLedger: NonceLedger
  let audit: AuditLog
  /// Set on SIGTERM: a device job in flight is allowed to finish within the
  /// drain grace even if its stream's task is cancelled.
  var draining: Draining? = nil
  /// For DescribeDevice's view of the calling tenant.
  var tenants: TenantDirectory? = nil
  /// Client memory registered on the local lane (nil when the lane is off, and
  /// on the TCP listener: spans are served only on the local socket).
  var regions: RegionRegistry? = nil
  /// The local lane's gRPC socket, on the TCP listener of a gateway that has
  /// one: spans sent over TCP are refused with a pointer to it.
  var localLaneSocket: String? = nil
  /// Where payload copies are counted (nil: not counted).
  var metrics: GatewayMetrics? = nil

  /// Where requests become jobs (AccelRequests): the same checks for every edge.
  var translator: JobTranslator {
    JobTranslator(limits: configuration.requestLimits, keyring: keyring, nonceLedger: nonceLedger, audit: audit)
  }

  /// The device and the calling tenant's view of it, whichever edge asks.
  func describeDevice(tenant id: String) -> Accelgate_V1_DescribeDeviceResponse {
    var r = DeviceDescription.make(dispatcher: dispatcher, device: device, configuration: configuration)
    let (jobs, bytes, limits) = dispatcher.tenantState(id)
    r.tenant = .with {
      $0.id = id
      $0.weight = tenants?.current.policies.first { $0.id == id }?.weight ?? 1
      $0.queuedJobs = UInt32(clamping: jobs)
      $0.queuedBytes = UInt64(max(0, bytes))
      $0.maxQueuedJobs = UInt32(clamping: limits.maxQueuedJobs)
      $0.maxQueuedBytes = UInt64(max(0, limits.maxQueuedBytes))
      $0.maxPayloadBytes = UInt64(max(0, limits.maxPayloadBytes))
      $0.maxBytesPerSecond = UInt64(max(0, limits.maxBytesPerSecond ?? 0))
    }
    return r
  }

  // MARK: helpers

  /// Runs a job under the call's deadline, cancelling it if the task is cancelled.
  ///
  /// The edge cancels a stream's task when the client's `grpc-timeout` runs
  /// out; the job then fails with DEADLINE_EXCEEDED rather than CANCELLED,
  /// whichever of the sweeper and the cancellation gets there first.
  func run(_ job: JobRequest, operation: String, outputLimit: Int, deadline: CallDeadline) async throws
    -> JobResult
  {
    var job = job
    job.deadline = deadline.instant
    let id = dispatcher.makeJobID()
    do {
      return try await withTaskCancellationHandler {
        try await dispatcher.execute(job, id: id)
      } onCancel: { [dispatcher, draining] in
        // Draining: a cancellation then leaves the job running; the drain grace
        // bounds it (its end cancels the call itself).
        if draining?.isDraining == true && !deadline.hasPassed { return }
        dispatcher.cancel(id: id, reason: deadline.hasPassed ? .deadlineExceeded : .cancelled)
      }
    } catch let error as JobError {
      throw StatusMapping.callStatus(error, operation: operation, outputLimit: outputLimit)
    }
  }

  /// Runs a plan's job, pointed at the call's local-lane spans, under the call's deadline.
  func run(_ plan: JobPlan, spans: LocalSpans = LocalSpans(inputLength: 0), deadline: CallDeadline) async throws
    -> JobResult
  {
    var job = plan.job
    spans.apply(to: &job)
    return try await run(job, operation: plan.operation.rawValue, outputLimit: plan.outputLimit, deadline: deadline)
  }
}

extension ServiceConfiguration {
  /// The limits requests are checked against.
  var requestLimits: RequestLimits {
    RequestLimits(maxRequestBytes: maxRequestBytes, maxDecompressedBytes: maxDecompressedBytes)
  }
}

/// The client's deadline (`grpc-timeout`, as the C core parsed it); nil instant: none.
struct CallDeadline: Sendable {
  let instant: ContinuousClock.Instant?

  init(instant: ContinuousClock.Instant?) { self.instant = instant }

  /// How close to the deadline a cancellation counts as the deadline passing: the
  /// transport's timer starts slightly before this handler reads the header.
  static let tolerance: Duration = .milliseconds(50)

  var hasPassed: Bool {
    guard let instant else { return false }
    return ContinuousClock.now >= instant - Self.tolerance
  }
}
