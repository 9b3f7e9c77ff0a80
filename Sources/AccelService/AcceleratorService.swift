internal import AccelABI
internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import AccelProto
internal import AccelRequests
internal import AccelMessages
internal import FoundationEssentials
internal import GRPCCore
internal import AccelScheduler
internal import SwiftProtobuf

/// The gRPC face of the gateway: validates requests, turns them into jobs,
/// and maps outcomes to responses and statuses. No device logic lives here.
struct AcceleratorService: Accelgate_V1_Accelerator.ServiceProtocol {
  let dispatcher: Dispatcher
  let configuration: ServiceConfiguration
  let device: EmulatedDevice?
  let keyring: KeyringDirectory
  let nonceLedger: NonceLedger
  let audit: AuditLog
  /// Set on SIGTERM: grpc-swift then cancels every RPC so long handlers can wind
  /// down, but a device job in flight is allowed to finish within the drain grace.
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

  func compress(request envelope: ServerRequest<Accelgate_V1_CompressRequest>, context: ServerContext) async throws
    -> ServerResponse<Accelgate_V1_CompressResponse>
  {
    ServerResponse(message: try await compress(envelope.message, metadata: envelope.metadata, lane: .copied).message)
  }

  /// One Compress call, whichever way its payload travels (`PayloadLane`).
  func compress(_ m: Accelgate_V1_CompressRequest, metadata: Metadata, lane: PayloadLane) async throws
    -> LaneResponse<Accelgate_V1_CompressResponse>
  {
    let tenant = TenantHeader.tenant(of: metadata)
    let spans = try localSpans(
      input: m.hasInputRegion ? m.inputRegion : nil, output: m.hasOutputRegion ? m.outputRegion : nil,
      inline: lane.payloadCount(inline: m.data), tenant: tenant, operation: "compress", outputLimit: Int(UInt32.max))
    let plan = try translator.compress(m, tenant: tenant, lane: lane, spans: spans.lengths)
    let result = try await run(plan, spans: spans, deadline: CallDeadline(metadata: metadata))
    recordCopies(tenant: tenant, operation: "compress", lane: lane, spans: spans, result: result)
    var response = plan.compressResponse(result)
    if spans.output != nil { response.regionOutputLength = result.stats.outputBytes }
    return LaneResponse(message: response, pooled: result.pooledOutput)
  }

  func decompress(request envelope: ServerRequest<Accelgate_V1_DecompressRequest>, context: ServerContext) async throws
    -> ServerResponse<Accelgate_V1_DecompressResponse>
  {
    ServerResponse(message: try await decompress(envelope.message, metadata: envelope.metadata, lane: .copied).message)
  }

  /// One Decompress call, whichever way its payload travels (`PayloadLane`).
  func decompress(_ m: Accelgate_V1_DecompressRequest, metadata: Metadata, lane: PayloadLane) async throws
    -> LaneResponse<Accelgate_V1_DecompressResponse>
  {
    let tenant = TenantHeader.tenant(of: metadata)
    // The request is checked before its spans are bound (a bad format is refused as such).
    var plan = try translator.decompress(m, tenant: tenant, lane: lane)
    let spans = try localSpans(
      input: m.hasInputRegion ? m.inputRegion : nil, output: m.hasOutputRegion ? m.outputRegion : nil,
      inline: lane.payloadCount(inline: m.data), tenant: tenant, operation: "decompress",
      outputLimit: plan.job.outputCapacity)
    if let output = spans.lengths.output { plan.outputLimit = output }
    let result = try await run(plan, spans: spans, deadline: CallDeadline(metadata: metadata))
    recordCopies(tenant: tenant, operation: "decompress", lane: lane, spans: spans, result: result)
    var response = plan.decompressResponse(result)
    if spans.output != nil { response.regionOutputLength = result.stats.outputBytes }
    return LaneResponse(message: response, pooled: result.pooledOutput)
  }

  func describeDevice(request: ServerRequest<Accelgate_V1_DescribeDeviceRequest>, context: ServerContext) async throws
    -> ServerResponse<Accelgate_V1_DescribeDeviceResponse>
  {
    ServerResponse(message: describeDevice(tenant: TenantHeader.tenant(of: request.metadata)))
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

  /// Runs a job under the call's deadline, cancelling it if the RPC is cancelled.
  ///
  /// grpc-swift cancels the RPC when the client's `grpc-timeout` runs out; the job
  /// then fails with DEADLINE_EXCEEDED rather than CANCELLED, whichever of the
  /// sweeper and the cancellation gets there first.
  func run(_ job: JobRequest, operation: String, outputLimit: Int, deadline: CallDeadline) async throws
    -> JobResult
  {
    var job = job
    job.deadline = deadline.instant
    let id = dispatcher.makeJobID()
    do {
      return try await withRPCCancellationHandler { () async throws(JobError) -> JobResult in
        try await dispatcher.execute(job, id: id)
      } onCancelRPC: { [dispatcher, draining] in
        // Draining: the transport cancels every RPC when it quiesces; the job keeps
        // running, and the drain grace bounds it (its end cancels the task itself).
        if draining?.isDraining == true && !deadline.hasPassed { return }
        dispatcher.cancel(id: id, reason: deadline.hasPassed ? .deadlineExceeded : .cancelled)
      }
    } catch {
      throw StatusMapping.rpcError(error, operation: operation, outputLimit: outputLimit)
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

/// The client's deadline, from the `grpc-timeout` header (gRPC over HTTP/2 spec:
/// up to 8 digits and a unit, H M S m u n).
struct CallDeadline: Sendable {
  let instant: ContinuousClock.Instant?

  /// A deadline the transport parsed already (the C core's).
  init(instant: ContinuousClock.Instant?) { self.instant = instant }

  /// How close to the deadline a cancellation counts as the deadline passing: the
  /// transport's timer starts slightly before this handler reads the header.
  static let tolerance: Duration = .milliseconds(50)

  init(metadata: Metadata, now: ContinuousClock.Instant = .now) {
    instant = metadata[stringValues: "grpc-timeout"].first(where: { _ in true }).flatMap(Self.parse).map { now + $0 }
  }

  var hasPassed: Bool {
    guard let instant else { return false }
    return ContinuousClock.now >= instant - Self.tolerance
  }

  static func parse(_ value: String) -> Duration? {
    guard let unit = value.last, value.count >= 2, value.count <= 9, let amount = Int64(value.dropLast()), amount >= 0
    else { return nil }
    switch unit {
    case "H": return .seconds(amount * 3600)
    case "M": return .seconds(amount * 60)
    case "S": return .seconds(amount)
    case "m": return .milliseconds(amount)
    case "u": return .microseconds(amount)
    case "n": return .nanoseconds(amount)
    default: return nil
    }
  }
}
