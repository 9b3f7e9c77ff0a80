internal import AccelABI
internal import Prometheus

/// The series one record touches, made together the first time its labels are seen.
extension GatewayMetrics {
  struct CallKey: Hashable, Sendable {
    let method: String
    let code: String
    let tenant: String
  }

  struct CallSeries: Sendable {
    let requests: Counter
    let duration: DurationHistogram
  }

  struct JobKey: Hashable, Sendable {
    let tenant: String
    let opcode: DeviceOpcode
    let algorithm: DeviceAlgorithm
    let outcome: String
    /// Whether the job ran (has statistics): only then are its device series touched.
    let completed: Bool
  }

  struct JobSeries: Sendable {
    let jobs: Counter
    let completed: CompletedJobSeries?
  }

  struct CompletedJobSeries: Sendable {
    let deviceSeconds: Counter
    let bytesIn: Counter
    let bytesOut: Counter
    let queueWait: DurationHistogram
    let duration: DurationHistogram
    let batchSize: ValueHistogram
  }

  struct CopyKey: Hashable, Sendable {
    let tenant: String
    let operation: String
    let direction: String
    let path: String
  }

  struct CopySeries: Sendable {
    let jobs: Counter
    let copies: Counter
    let bytes: Counter
  }

  static func callSeries(_ k: CallKey, _ registry: PrometheusCollectorRegistry) -> CallSeries {
    CallSeries(
      requests: registry.makeCounter(
        descriptor: descriptor("accelgate_requests_total", "Finished RPCs by method, gRPC status code and tenant."),
        labels: [("method", k.method), ("code", k.code), ("tenant", k.tenant)]),
      duration: registry.makeDurationHistogram(
        descriptor: descriptor(
          "accelgate_request_duration_seconds", "Time from the start of an RPC to its status, by method."),
        labels: [("method", k.method)], buckets: latencyBuckets))
  }

  static func jobSeries(_ k: JobKey, _ registry: PrometheusCollectorRegistry) -> JobSeries {
    let jobs = registry.makeCounter(
      descriptor: descriptor(
        "accelgate_jobs_total", "Device jobs by tenant, operation, algorithm and outcome (ok, or the error kind)."),
      labels: [
        ("tenant", k.tenant), ("operation", "\(k.opcode)"), ("algorithm", "\(k.algorithm)"), ("outcome", k.outcome),
      ])
    guard k.completed else { return JobSeries(jobs: jobs, completed: nil) }
    let op = "\(k.opcode)"
    let bytesHelp = "Job payload bytes into and out of the device, by tenant and operation."
    return JobSeries(
      jobs: jobs,
      completed: CompletedJobSeries(
        deviceSeconds: registry.makeCounter(
          descriptor: descriptor(
            "accelgate_device_seconds_total",
            "Device (engine) time consumed by each tenant's jobs: the quantity the fair scheduler shares."),
          labels: [("tenant", k.tenant)]),
        bytesIn: registry.makeCounter(
          descriptor: descriptor("accelgate_job_bytes_total", bytesHelp),
          labels: [("tenant", k.tenant), ("operation", op), ("direction", "in")]),
        bytesOut: registry.makeCounter(
          descriptor: descriptor("accelgate_job_bytes_total", bytesHelp),
          labels: [("tenant", k.tenant), ("operation", op), ("direction", "out")]),
        queueWait: registry.makeDurationHistogram(
          descriptor: descriptor(
            "accelgate_queue_wait_seconds",
            "Time a job waited in the scheduler before it was put on a device queue, by tenant."),
          labels: [("tenant", k.tenant)], buckets: latencyBuckets),
        duration: registry.makeDurationHistogram(
          descriptor: descriptor(
            "accelgate_job_duration_seconds",
            "Time from a job's admission to its completion (queue wait + device), by operation."),
          labels: [("operation", op)], buckets: latencyBuckets),
        batchSize: registry.makeValueHistogram(
          descriptor: descriptor(
            "accelgate_batch_size", "Descriptors published behind the doorbell that carried each job."),
          labels: [], buckets: [1, 2, 4, 8, 16, 32, 64])))
  }

  static func copySeries(_ k: CopyKey, _ registry: PrometheusCollectorRegistry) -> CopySeries {
    let labels = [("tenant", k.tenant), ("operation", k.operation), ("direction", k.direction), ("path", k.path)]
    return CopySeries(
      jobs: registry.makeCounter(
        descriptor: descriptor(
          "accelgate_payload_jobs_total",
          "Unary job calls by how their payload crossed a gateway boundary (direction in/out, path pooled/copied)."),
        labels: labels),
      copies: registry.makeCounter(
        descriptor: descriptor(
          "accelgate_payload_copies_total",
          "Payload copies made by the gateway between the transport's message bytes and the device pool (HTTP/2 framing not counted)."
        ), labels: labels),
      bytes: registry.makeCounter(
        descriptor: descriptor("accelgate_payload_copied_bytes_total", "Payload bytes copied (copies times payload size)."),
        labels: labels))
  }
}
