internal import AccelABI
internal import CAccelABI
internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import Prometheus
internal import Synchronization

/// The gateway's Prometheus metrics: what callers asked for and got (recorded
/// as calls end), and what the device and driver are doing (read from their
/// counters at scrape time). Names and labels are listed in the README; label
/// values come from bounded sets (methods, status codes, configured tenants,
/// queue and engine numbers).
final class GatewayMetrics: Sendable {
  let registry = PrometheusCollectorRegistry()
  private let mirrors = Mutex<[String: Double]>([:])
  /// Metrics made so far, by name and labels. The registry validates the name, labels and help
  /// text on every make: a profile of 4 KiB calls on the C-core edge spent about 5 % of the
  /// gateway's CPU there, so each series is made once and then found here.
  private let made = Mutex<[String: any Sendable]>([:])
  /// The series of each call, job and payload-copy record, by typed key (`SeriesCache`).
  private let calls: SeriesCache<CallKey, CallSeries>
  private let jobs: SeriesCache<JobKey, JobSeries>
  private let payloadCopies: SeriesCache<CopyKey, CopySeries>
  /// The local lane's registered regions (nil while the lane is off).
  private let regions = Mutex<RegionRegistry?>(nil)
  /// Pool bytes held by replies the C core is still sending.
  private let pins = Mutex<ReplyPins?>(nil)

  func observe(regions registry: RegionRegistry) { regions.withLock { $0 = registry } }
  func observe(pins replyPins: ReplyPins) { pins.withLock { $0 = replyPins } }

  static let latencyBuckets: [Duration] = [
    .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5),
    .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250),
    .milliseconds(500), .seconds(1), .seconds(2.5), .seconds(5), .seconds(10),
  ]

  init() {
    let registry = self.registry
    calls = SeriesCache { GatewayMetrics.callSeries($0, registry) }
    jobs = SeriesCache { GatewayMetrics.jobSeries($0, registry) }
    payloadCopies = SeriesCache { GatewayMetrics.copySeries($0, registry) }
    let abi = "\(ACCEL_ABI_VERSION_MAJOR).\(ACCEL_ABI_VERSION_MINOR)"
    gauge("accelgate_build_info", [("abi", abi)], "Always 1; labels carry the device ABI version the gateway speaks.")
      .set(to: 1)
    // Series without labels exist from the start (at 0), so rates and alerts on them work before the first event.
    recordUnauthenticated(by: 0)
  }

  // MARK: calls (recorded by AccessLog and the dispatcher observer)

  func recordCall(method: String, code: String, tenant: String, duration: Duration) {
    let series = calls[CallKey(method: method, code: code, tenant: tenant)]
    series.requests.increment()
    series.duration.record(duration)
  }

  func recordUnauthenticated(by n: Int64 = 1) {
    counter("accelgate_unauthenticated_total", [], "Calls refused for a missing or unknown API key.").increment(by: n)
  }

  /// One device job ended (from the dispatcher's observer).
  func recordJob(_ report: JobReport) {
    let tenant = report.tenant
    if let reason = report.rejection {
      counter(
        "accelgate_rejections_total", [("tenant", tenant), ("reason", reason)],
        "Jobs refused by admission control, by tenant and reason."
      ).increment()
    }
    let series = jobs[
      JobKey(tenant: tenant, opcode: report.opcode, algorithm: report.algorithm, outcome: report.outcome,
        completed: report.statistics != nil)]
    series.jobs.increment()
    guard let stats = report.statistics, let done = series.completed else { return }
    done.deviceSeconds.increment(by: Double(stats.deviceNanoseconds) / 1e9)
    done.bytesIn.increment(by: Int64(stats.inputBytes))
    done.bytesOut.increment(by: Int64(stats.outputBytes))
    done.queueWait.record(.nanoseconds(Int64(min(stats.queueWaitNanoseconds, UInt64(Int64.max)))))
    done.duration.record(.nanoseconds(Int64(min(stats.totalNanoseconds, UInt64(Int64.max)))))
    done.batchSize.record(Double(stats.batchSize))
  }

  // MARK: network lane (docs/NETWORK_LANE.md)

  /// The payload copies one unary job call made at one gateway boundary:
  /// `direction` "in" (request payload → device pool) or "out" (pool → response
  /// bytes); `path` "pooled" (the network lane's single copy) or "copied".
  /// Copies per job = `accelgate_payload_copies_total` / `accelgate_payload_jobs_total`.
  func recordPayloadCopies(tenant: String, operation: String, direction: String, path: String, copies: UInt32, bytes: Int) {
    let series = payloadCopies[CopyKey(tenant: tenant, operation: operation, direction: direction, path: path)]
    series.jobs.increment()
    series.copies.increment(by: Int64(copies))
    series.bytes.increment(by: Int64(copies) * Int64(bytes))
  }

  /// The network lane's deserializer could not stage a payload in a pool and decoded it the ordinary way.
  /// A reply from the pool waited longer than the write timeout in the core, and its call was ended.
  func recordReplyTimeout(tenant: String) {
    counter(
      "accelgate_reply_timeouts_total", [("tenant", tenant)],
      "Replies sent from the device pool that the client did not take within the write timeout; their calls were ended (CANCELLED) and the pool freed."
    ).increment()
  }

  func recordStagingRefusal(tenant: String, reason: String) {
    counter(
      "accelgate_staging_refusals_total", [("tenant", tenant), ("reason", reason)],
      "Request payloads the network lane could not stage in a device pool (tenant share, pool full, too large…), by tenant and reason."
    ).increment()
  }

  // MARK: scrape

  /// Refreshes the state-derived series and renders the text exposition format.
  func scrape(dispatcher: Dispatcher, device: EmulatedDevice?, fallback: EmulatedDevice?) -> [UInt8] {
    let snapshot = dispatcher.snapshot
    let queues = dispatcher.driver.queues
    gauge("accelgate_jobs_queued", [], "Jobs waiting in the scheduler.").set(to: Double(snapshot.queued))
    if let registry = regions.withLock({ $0 }) {
      let (count, busy) = registry.usage
      gauge("accelgate_local_regions", [], "Local lane: client memory regions held (registered, or unregistered and still used by calls in progress).").set(to: Double(count))
      gauge(
        "accelgate_local_region_spans_in_use", [],
        "Local lane: region spans held by calls in progress (waiting or on the device); a region is unregistered only at 0.")
        .set(to: Double(busy))
    }
    if let pins = pins.withLock({ $0 }) {
      gauge(
        "accelgate_reply_pinned_bytes", [],
        "Device pool bytes held by replies the gRPC core is still sending in place (bounded per tenant; longer than the write timeout ends the call)."
      ).set(to: Double(pins.totalHeld))
    }
    gauge("accelgate_device_attached", [], "1 while the gateway has a device (embedded, standalone or fallback).")
      .set(to: dispatcher.isAttached ? 1 : 0)
    gauge("accelgate_degraded", [], "1 while the software fallback serves in place of the standalone device.")
      .set(to: dispatcher.degraded != nil ? 1 : 0)
    let isolated = (device ?? fallback)?.isIsolated ?? false
    gauge("accelgate_device_isolated", [], "1 while the (embedded) device is isolated after repeated queue errors.")
      .set(to: isolated ? 1 : 0)
    mirror("accelgate_jobs_retried_total", [], "Jobs retried once after a queue error.", Double(snapshot.retried))
    gauge(
      "accelgate_staging_held_bytes", [],
      "Network lane: pool bytes all tenants hold in staging zones (payloads waiting or on the device; what tenant shares limit)."
    ).set(to: Double(dispatcher.stagedBytesByTenant.values.reduce(0, +)))
    for q in queues {
      let l = [("queue", "\(q.queueID)")]
      let s = q.statistics
      gauge("accelgate_queue_in_flight", l, "Jobs on each device queue.")
        .set(to: Double(q.index < snapshot.inFlight.count ? snapshot.inFlight[q.index] : 0))
      gauge("accelgate_queue_healthy", l, "1 while a device queue takes new jobs.").set(to: q.isHealthy ? 1 : 0)
      mirror("accelgate_queue_descriptors_total", l, "Jobs submitted to each device queue.", Double(s.submitted))
      mirror("accelgate_queue_completions_total", l, "Valid completions reaped from each device queue.", Double(s.completed))
      mirror("accelgate_queue_doorbells_total", l, "Batches published (one tail store each) per queue.", Double(s.batches))
      mirror(
        "accelgate_queue_doorbell_wakes_total", l, "Doorbell wake syscalls per queue (only when an engine slept).",
        Double(s.doorbellWakes))
      mirror(
        "accelgate_queue_invalid_completions_total", l, "Completions the driver rejected as malformed or forged.",
        Double(s.invalidCompletions))
      mirror(
        "accelgate_queue_stalls_total", l, "Times jobs on a queue went without a completion past the timeout.",
        Double(s.stalls))
      mirror("accelgate_queue_resets_total", l, "Queue resets the driver asked the device for.", Double(s.resets))
      let contexts = q.streamContexts
      gauge("accelgate_queue_stream_contexts", l, "Stream contexts each device queue offers (CompressStream/DecompressStream).")
        .set(to: Double(contexts.total))
      gauge(
        "accelgate_queue_stream_contexts_open", l,
        "Stream contexts in use on each queue (open streams, and closed ones whose last slice is still on the device)."
      ).set(to: Double(contexts.open))
      gauge("accelgate_queue_staging_zone_bytes", l, "Network lane: the top of each queue's pool where request payloads may be staged (0: off).")
        .set(to: Double(q.stagingZoneBytes))
      gauge("accelgate_queue_staged_bytes", l, "Network lane: pool bytes held by staged payloads whose job is not yet on the device.")
        .set(to: Double(q.stagedBytes))
    }
    if let device = device ?? fallback {
      for e in device.engines {
        let l = [("engine", "\(e.id)")]
        mirror("accelgate_engine_jobs_total", l, "Jobs run by each engine of the embedded device.", Double(e.jobCount))
        mirror(
          "accelgate_engine_busy_seconds_total", l, "Time each engine of the embedded device spent on jobs.",
          Double(e.busyTime) / 1e9)
      }
      let errors = device.errorStatistics
      mirror("accelgate_device_queue_errors_total", [], "Queue errors the embedded device counted.", Double(errors.queueErrors))
      mirror("accelgate_device_isolations_total", [], "Times the embedded device isolated itself.", Double(errors.isolations))
    }
    return registry.emitToBuffer()
  }

  static func descriptor(_ name: String, _ help: String) -> MetricNameDescriptor {
    MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
  }

  /// The series `name` with `labels`, made by `make` the first time it is asked for.
  private func series<M: Sendable>(_ name: String, _ labels: [(String, String)], _ make: () -> M) -> M {
    var key = name
    for (k, v) in labels {
      key.append("\u{1}")
      key.append(k)
      key.append("\u{2}")
      key.append(v)
    }
    return made.withLock { m in
      if let found = m[key] as? M { return found }
      let new = make()
      m[key] = new
      return new
    }
  }

  private func gauge(_ name: String, _ labels: [(String, String)], _ help: String) -> Gauge {
    series(name, labels) { registry.makeGauge(descriptor: Self.descriptor(name, help), labels: labels) }
  }

  private func counter(_ name: String, _ labels: [(String, String)], _ help: String) -> Counter {
    series(name, labels) { registry.makeCounter(descriptor: Self.descriptor(name, help), labels: labels) }
  }

  /// A counter that follows a monotonic count kept elsewhere: increments by what
  /// it grew since the last scrape (a count that went down, because a driver was
  /// replaced, restarts from its new value).
  private func mirror(_ name: String, _ labels: [(String, String)], _ help: String, _ value: Double) {
    let key = name + labels.map { "|\($0.0)=\($0.1)" }.joined()
    let delta = mirrors.withLock { m -> Double in
      let last = m[key] ?? 0
      m[key] = value
      return value >= last ? value - last : value
    }
    let c = counter(name, labels, help)
    if delta > 0 { c.increment(by: delta) }
  }
}
