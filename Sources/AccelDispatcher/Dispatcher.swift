package import AccelABI
package import AccelDriver
package import AccelScheduler
internal import FoundationEssentials
package import Logging
internal import Synchronization

/// Dispatcher settings.
package struct DispatcherConfiguration: Sendable {
  /// Jobs that may wait in the scheduler at once; beyond it, RESOURCE_EXHAUSTED.
  package var maxQueuedJobs: Int = 1024
  /// Most descriptors kept on each hardware queue.
  package var inFlightPerQueue: Int = 8
  /// Estimated device time kept on each hardware queue. A queue takes another job
  /// only while its in-flight estimate stays under this budget (one job always
  /// fits), so small jobs pipeline deeply while large ones queue one at a time:
  /// the rings hold just enough to keep the engines busy and every ordering
  /// decision stays in the scheduler, not in a FIFO ring.
  package var inFlightBudget: Duration = .milliseconds(2)
  /// Most descriptors published behind one doorbell.
  package var maxBatch: Int = 16
  /// Most payload bytes all jobs together may hold in the gateway, waiting or
  /// on the device (across tenants); beyond it, RESOURCE_EXHAUSTED with a retry
  /// hint. One job is always admitted when none is held. nil = unbounded.
  package var maxQueuedBytes: Int? = nil
  /// Deadline for calls that bring none.
  package var defaultDeadline: Duration = .seconds(30)
  /// How often waiting jobs are checked against their deadlines.
  package var sweepInterval: Duration = .milliseconds(20)
  /// Which policy orders waiting jobs.
  package var scheduler: SchedulerKind = .fair
  /// Compress-and-verify: every compression step asks the device to check its
  /// output by decompressing it (ABI 1.2 `ACCEL_SQE_F_VERIFY`).
  package var verifyCompression = false
  /// Virtual-time credit a returning tenant may claim (fair scheduler), in ns of device time.
  package var idleCredit: UInt64 = 0
  /// Network lane: bytes at the top of each queue's pool where payloads may be
  /// staged before their job is scheduled (`stageInput`); 0 = no staging.
  package var stagingZoneBytes: UInt64 = 0
  /// The largest job's pool footprint. A queue's staging zone is shrunk so that
  /// the rest of its pool still holds it: dispatch never waits on staged
  /// payloads (docs/NETWORK_LANE.md, "Pool protection").
  package var largestJobBytes: UInt64 = 0
  /// How long a tenant that asked to stage counts as competing for the zones
  /// (and so shrinks the others' shares) while it holds nothing.
  package var stagingContenderWindow: Duration = .seconds(1)

  /// The staging zone of a pool of `capacity` bytes.
  package func stagingZone(poolCapacity capacity: UInt64) -> UInt64 {
    min(stagingZoneBytes, capacity - min(capacity, largestJobBytes))
  }
  package init() {}
  package static var defaults: Self { Self() }
}

/// Moves jobs from callers, through the scheduler, onto hardware queues, and
/// hands completions back.
///
/// Callers `execute` a job and suspend. `pump` pops jobs the device has room
/// for, copies their input into the queue's pool and publishes them in
/// batches. The reaper resumes the caller, which copies the output out and
/// frees the buffers. One pumper runs at a time; others leave it a note.
package final class Dispatcher: Sendable {
  private let driverRef: Mutex<DeviceDriver>
  /// Set while the device is gone: new jobs fail at once with UNAVAILABLE.
  private let detachedReasonBox = Mutex<String?>(nil)
  /// Set while a stand-in device serves (see `failover`).
  private let degradedReason = Mutex<String?>(nil)
  private let observerBox = Mutex<CallbackBox<JobReport>?>(nil)
  /// The driver jobs go to now (replaced when a standalone device comes back).
  package var driver: DeviceDriver { driverRef.withLock { $0 } }
  package let configuration: DispatcherConfiguration
  private let logger: Logger
  private let state: Mutex<State>
  private let clock = ContinuousClock()
  private let epoch: ContinuousClock.Instant
  private let sweeper: Mutex<Task<Void, Never>?> = Mutex(nil)
  private let batchHistogram = Mutex<[Int]>(Array(repeating: 0, count: 65))
  /// Network lane: staged bytes by tenant (see `stageInput`). Never held while
  /// taking another lock.
  let stagingLedger = Mutex(StagingLedger())

  private enum Outcome: Sendable {
    case completed(
      Completion, Lease, DriverQueue, enqueuedAt: ContinuousClock.Instant, dispatchedAt: ContinuousClock.Instant,
      batchSize: Int, inputCopies: UInt32)
    case failed(JobError)
  }

  /// Where a job's outcome goes: a suspended task's continuation, or a callback.
  private enum OutcomeSink: Sendable {
    case task(CheckedContinuation<Outcome, Never>)
    case callback(@Sendable (Outcome) -> Void)

    func resume(returning outcome: Outcome) {
      switch self {
      case .task(let c): c.resume(returning: outcome)
      case .callback(let deliver): deliver(outcome)
      }
    }
  }

  private struct Pending {
    var request: JobRequest
    var job: QueuedJob
    var jobClass: CostModel.JobClass
    var enqueuedAt: ContinuousClock.Instant
    var deadline: ContinuousClock.Instant
    var continuation: OutcomeSink?
    /// Set once dispatched; the lease must be released after the device completes.
    var lease: Lease?
    var dispatchedAt: ContinuousClock.Instant?
    var batchSize = 0
    /// The caller has gone (cancelled or timed out) while the job was on the device.
    var abandoned = false
    /// Times the job was put back after a queue error (at most once).
    var retries = 0
    /// Copies of the payload made into a pool (see `JobStatistics.inputCopies`).
    var inputCopies: UInt32 = 0
  }

  private struct State {
    var scheduler: any JobScheduler
    var admission = AdmissionControl()
    var cost = CostModel(prior: Dispatcher.prior)
    var roomWaiters: [String: [UInt64: CheckedContinuation<Void, Never>]] = [:]
    var nextWaiterID: UInt64 = 0
    var jobs: [UInt64: Pending] = [:]
    var inFlight: [Int]
    /// Estimated device time (ns) on each queue.
    var inFlightCost: [UInt64]
    var nextID: UInt64 = 1
    var pumping = false
    var pumpAgain = false
    var cancelledEarly: [UInt64: JobError] = [:]
    var shuttingDown = false
    var retried: UInt64 = 0
    var nextChain: UInt64 = 1
    /// Payload bytes of every job the gateway holds, waiting or on the device
    /// (its request stays in memory until it completes; see `maxQueuedBytes`).
    var heldBytes = 0
    /// Open streams by tenant, and the memory their device contexts may take
    /// (counted in the same budget as `heldBytes`).
    var openStreams: [String: Int] = [:]
    var streamContextBytes = 0
    /// Streams closed while a slice was still on the device, by chain, with the
    /// number of their slices there: the context slot goes back to its queue
    /// when the last one completes, never before (a new stream on the slot
    /// would otherwise share the context with a slice still running).
    var closingStreams: [UInt64: (target: StreamTarget, running: Int)] = [:]

    /// A dispatched job has left the device: the stream slot to give back now,
    /// if the job was the last one on the device of a closed stream.
    mutating func leftDevice(_ p: Pending) -> StreamTarget? {
      guard let chain = p.request.stream?.chain, let closing = closingStreams[chain] else { return nil }
      guard closing.running <= 1 else {
        closingStreams[chain]?.running -= 1
        return nil
      }
      closingStreams[chain] = nil
      return closing.target
    }

    /// Drops a job that has not completed (cancelled, expired, failed while waiting).
    mutating func forget(_ id: UInt64) {
      if let p = jobs.removeValue(forKey: id) { heldBytes -= p.request.payloadCount }
    }
  }

  package init(
    driver: DeviceDriver, configuration: DispatcherConfiguration = .defaults, tenants: [TenantPolicy] = [],
    logger: Logger = Logger(label: "accelgate.dispatcher")
  ) {
    self.driverRef = Mutex(driver)
    self.configuration = configuration
    self.logger = logger
    self.epoch = clock.now
    let scheduler: any JobScheduler =
      switch configuration.scheduler {
      case .fair: FairScheduler(configuration: .init(idleCredit: configuration.idleCredit))
      case .fifo: FIFOScheduler()
      }
    self.state = Mutex(
      State(
        scheduler: scheduler, inFlight: Array(repeating: 0, count: driver.queues.count),
        inFlightCost: Array(repeating: 0, count: driver.queues.count)))
    for q in driver.queues { q.setStagingZone(bytes: configuration.stagingZone(poolCapacity: q.poolCapacity)) }
    updateTenants(tenants)
  }

  /// Installs tenant weights and limits (at start and on reload). Jobs already
  /// waiting keep their place; new limits apply to new jobs.
  package func updateTenants(_ tenants: [TenantPolicy]) {
    let now = nanos(clock.now)
    let woken = state.withLock { s -> [CheckedContinuation<Void, Never>] in
      for t in tenants {
        s.scheduler.setWeight(t.weight, for: t.id)
        s.admission.setLimits(t.limits, for: t.id, now: now)
      }
      return s.roomWaiters.keys.flatMap { takeRoomWaitersLocked(&s, tenant: $0) }
    }
    for c in woken { c.resume() }
  }

  /// Starting estimates of device time per byte, before any completion is seen:
  /// roughly the engines' single-core speed on the reference machine.
  static let prior: @Sendable (CostModel.JobClass) -> Double = { c in
    guard c.operation == DeviceOpcode.compress.rawValue else { return 1.0 }
    return [0.5, 2.0, 10.0][Int(min(c.band, 2))]
  }

  static func jobClass(_ r: JobRequest) -> CostModel.JobClass {
    let band: UInt8 = r.opcode == .compress ? (r.level == 0 ? 0 : r.level <= 3 ? 1 : 2) : 0
    return CostModel.JobClass(
      operation: r.opcode.rawValue, algorithm: r.algorithm.rawValue, band: band,
      sizeBand: CostModel.JobClass.sizeBand(r.deviceInputBytes))
  }

  /// Starts the reaper hook and the deadline sweeper.
  package func start() {
    let driver = self.driver
    driver.setAfterReap { [weak self] in self?.pump() }
    driver.start()
    let interval = configuration.sweepInterval
    sweeper.withLock {
      $0 = Task.detached { [weak self] in
        while !Task.isCancelled {
          try? await Task.sleep(for: interval)
          guard let self else { return }
          self.expireOverdue()
          self.pump()
        }
      }
    }
  }

  /// Fails every waiting job and stops the sweeper. In-flight jobs finish.
  package func shutdown() {
    sweeper.withLock { $0?.cancel() }
    let waiting = state.withLock { s -> [OutcomeSink] in
      s.shuttingDown = true
      var out: [OutcomeSink] = []
      for (id, p) in s.jobs where p.lease == nil {
        _ = s.scheduler.remove(id: id)
        if let c = s.jobs[id]?.continuation { out.append(c) }
        s.forget(id)
        Self.leaveLocked(&s, p.request)
      }
      return out
    }
    let readers = state.withLock { s in s.roomWaiters.values.flatMap { Array($0.values) } }
    state.withLock { $0.roomWaiters = [:] }
    for c in waiting { c.resume(returning: .failed(.shuttingDown)) }
    for r in readers { r.resume() }
  }

  /// A fresh job id, for callers that must be able to cancel before `execute` runs.
  package func makeJobID() -> UInt64 { state.withLock { s in defer { s.nextID += 1 }; return s.nextID } }

  /// Largest input + output a single job can ever have.
  package var maxJobFootprint: UInt64 { driver.queues.map(\.poolCapacity).max() ?? 0 }

  /// Called once for every job that `execute` ends, on the caller's task. Must be quick.
  package func setObserver(_ observer: @escaping @Sendable (JobReport) -> Void) {
    observerBox.withLock { $0 = CallbackBox(observer) }
  }

  /// Runs one job to completion, or fails with a `JobError`.
  package func execute(_ request: JobRequest, id: UInt64? = nil) async throws(JobError) -> JobResult {
    let observer = observerBox.withLock { $0 }
    do {
      let result = try await run(request, id: id)
      observer?.call(JobReport(request: request, outcome: "ok", statistics: result.stats))
      return result
    } catch {
      observer?.call(Self.report(request, failure: error))
      throw error
    }
  }

  /// Runs one job to completion on the calling task (cancelling the task cancels the job).
  private func run(_ request: JobRequest, id: UInt64?) async throws(JobError) -> JobResult {
    let id = id ?? makeJobID()
    // A staged payload that never becomes a job's input goes back to the pool
    // as soon as the job ends (adopted by a lease, it is freed with the lease).
    defer { request.stagedInput?.release() }
    try checkFootprint(request)
    let outcome = await withTaskCancellationHandler {
      await withCheckedContinuation { (cont: CheckedContinuation<Outcome, Never>) in
        let sink = OutcomeSink.task(cont)
        if let refused = enqueue(request, id: id, sink: sink) {
          sink.resume(returning: .failed(refused))
        } else {
          pump()
        }
      }
    } onCancel: {
      cancel(id: id)
    }
    return try result(of: outcome, for: request)
  }

  /// Submits one job without a task: `completion` runs exactly once, on the
  /// thread that ends the job (the reaper for a device completion, the sweeper
  /// for a deadline, a canceller, or this caller for a refusal), and must be
  /// quick. `cancel(id:)` ends it early. This is the entry for an edge whose
  /// threads are not Swift tasks (the gRPC C core's completion-queue threads).
  package func submit(
    _ request: JobRequest, id: UInt64, completion: @escaping @Sendable (Result<JobResult, JobError>) -> Void
  ) {
    let observer = observerBox.withLock { $0 }
    let finish: @Sendable (Result<JobResult, JobError>) -> Void = { outcome in
      request.stagedInput?.release()
      switch outcome {
      case .success(let r): observer?.call(JobReport(request: request, outcome: "ok", statistics: r.stats))
      case .failure(let e): observer?.call(Self.report(request, failure: e))
      }
      completion(outcome)
    }
    do { try checkFootprint(request) } catch {
      finish(.failure(error))
      return
    }
    let sink = OutcomeSink.callback { [self] outcome in
      finish(Result { () throws(JobError) -> JobResult in try self.result(of: outcome, for: request) })
    }
    if let refused = enqueue(request, id: id, sink: sink) {
      sink.resume(returning: .failed(refused))
    } else {
      pump()
    }
  }

  /// The observer's record of a job that failed.
  private static func report(_ request: JobRequest, failure error: JobError) -> JobReport {
    var report = JobReport(request: request, outcome: error.kind, statistics: nil)
    switch error {
    case .rejected(let reason, _): report.rejection = reason.rawValue
    case .payloadOverTenantLimit: report.rejection = "payload_too_large"
    default: break
    }
    return report
  }

  /// Refuses a job whose buffers could never fit in a queue's pool.
  private func checkFootprint(_ request: JobRequest) throws(JobError) {
    let queue0 = driver.queues[0]
    let payloadCount = request.payloadCount
    let footprint =
      (request.inputSpan == nil ? queue0.poolFootprint(UInt64(request.stagedInput?.length ?? payloadCount)) : 0)
      + (request.outputSpan == nil ? queue0.poolFootprint(UInt64(request.outputCapacity)) : 0)
      + (request.aux.isEmpty ? 0 : queue0.poolFootprint(UInt64(request.aux.count)))
      + (request.midCapacity > 0 ? queue0.poolFootprint(UInt64(request.midCapacity)) : 0)
    guard footprint <= maxJobFootprint, payloadCount <= Int(UInt32.max), request.outputCapacity <= Int(UInt32.max)
    else { throw .tooLarge(needed: footprint, limit: maxJobFootprint) }
  }

  /// Admits a job into the scheduler with the sink that hears its outcome; or
  /// says why not, and then the sink is not kept.
  private func enqueue(_ request: JobRequest, id: UInt64, sink: OutcomeSink) -> JobError? {
    let payloadCount = request.payloadCount
    let now = clock.now
    let jobClass = Self.jobClass(request)
    let detached = detachedReasonBox.withLock { $0 } ?? noQueueCanServe
    return state.withLock { s -> JobError? in
      if s.shuttingDown { return .shuttingDown }
      if let detached { return .unavailable(detached) }
      if let reason = s.cancelledEarly.removeValue(forKey: id) { return reason }
      if s.scheduler.count >= configuration.maxQueuedJobs {
        return .rejected(reason: .queueFull, retryAfterMilliseconds: retryHintLocked(s))
      }
      // Open streams' contexts count too, except for a stream's own slices (its
      // context is already in the budget).
      let held = s.heldBytes + (request.stream == nil ? s.streamContextBytes : 0)
      if let budget = configuration.maxQueuedBytes, held > 0, held + payloadCount > budget {
        return .rejected(reason: .gatewayMemory, retryAfterMilliseconds: retryHintLocked(s))
      }
      let cost = s.cost.estimate(jobClass, bytes: request.deviceInputBytes)
      let backlog = UInt64(s.admission.queuedJobs(request.tenant) + 1) * cost
      let engines = UInt64(max(1, configuration.inFlightPerQueue * s.inFlight.count / 2))
      if let refusal = s.admission.admit(
        tenant: request.tenant, bytes: request.chargedBytes, now: nanos(now), drainEstimate: backlog / engines)
      {
        return Self.jobError(refusal, size: request.chargedBytes)
      }
      s.heldBytes += payloadCount
      let job = QueuedJob(
        id: id, tenant: request.tenant, cost: cost, chain: request.stream?.chain ?? 0, sequence: request.streamSequence)
      s.jobs[id] = Pending(
        request: request, job: job, jobClass: jobClass, enqueuedAt: now,
        deadline: request.deadline ?? now.advanced(by: configuration.defaultDeadline), continuation: sink)
      s.scheduler.enqueue(job, now: nanos(now))
      return nil
    }
  }

  /// The caller's view of a job's outcome: its result, or why it failed.
  private func result(of outcome: Outcome, for request: JobRequest) throws(JobError) -> JobResult {
    switch outcome {
    case .failed(let e):
      throw e
    case .completed(let completion, let lease, let q, let enqueuedAt, let dispatchedAt, let batchSize, let inputCopies):
      var handedOver = false
      defer {
        if !handedOver {
          q.release(lease, keepAlive: request.retain)
          pump()
        }
      }
      guard completion.status == .ok || (completion.status == .moreOutput && request.stream != nil) else {
        if request.stream != nil && completion.status == .invalidDescriptor {
          throw .unavailable("the stream's context is gone (its device queue was reset); restart the stream")
        }
        if completion.status.errorClass == .queue {
          throw .unavailable("device: \(completion.detail ?? "\(completion.status) on queue \(q.queueID)")")
        }
        throw .device(completion.status)
      }
      // Local lane: the device wrote straight into the client's memory.
      // Network lane: the caller writes the output out of the pool itself.
      let pooled =
        request.output.isPooled && request.stream == nil && completion.status == .ok
        ? PooledOutput(queue: q, lease: lease, count: Int(completion.produced)) { [weak self] in self?.pump() } : nil
      handedOver = pooled != nil
      let copiesOut = request.outputSpan == nil && pooled == nil
      let output = copiesOut ? Data(q.output(lease, count: Int(completion.produced))) : Data()
      let end = clock.now
      var result = JobResult(
        output: output,
        stats: JobStatistics(
          queueWaitNanoseconds: UInt64((dispatchedAt - enqueuedAt).nanosecondsClamped),
          deviceNanoseconds: completion.engineNanoseconds,
          totalNanoseconds: UInt64((end - enqueuedAt).nanosecondsClamped),
          inputBytes: UInt64(request.deviceInputBytes), outputBytes: UInt64(completion.produced),
          queueID: q.queueID, engineID: UInt32(completion.engineID), batchSize: UInt32(batchSize),
          inputCopies: inputCopies, outputCopies: copiesOut ? 1 : 0))
      result.pooledOutput = pooled
      result.moreOutput = completion.status == .moreOutput
      result.consumed = Int(completion.consumed)
      return result
    }
  }

  // MARK: streams

  /// Opens a stream context on the healthy queue with the least device time in
  /// flight. The stream's chunks all run there (its state lives in that queue).
  ///
  /// A tenant holds at most `TenantLimits.maxOpenStreams` streams, and the
  /// context's memory (`contextBytes`, see `StreamContextMemory`) counts in the
  /// gateway's memory budget (`maxQueuedBytes`) for as long as the stream is open.
  package func openStream(tenant: String = "default", contextBytes: Int = 0) throws(JobError) -> StreamTarget {
    let driver = self.driver
    guard isAttached else { throw .unavailable(detachedReason ?? "device unavailable") }
    let order = try state.withLock { s throws(JobError) in
      let limit = s.admission.limits(for: tenant).maxOpenStreams
      guard s.openStreams[tenant, default: 0] < limit else {
        throw .rejected(reason: .tenantStreams, retryAfterMilliseconds: 1000)
      }
      let held = s.heldBytes + s.streamContextBytes
      if let budget = configuration.maxQueuedBytes, held > 0, held + contextBytes > budget {
        throw .rejected(reason: .gatewayMemory, retryAfterMilliseconds: retryHintLocked(s))
      }
      s.openStreams[tenant, default: 0] += 1
      s.streamContextBytes += contextBytes
      return driver.queues.filter(\.isHealthy).sorted { s.inFlightCost[$0.index] < s.inFlightCost[$1.index] }
    }
    for q in order {
      if let slot = q.openStream() {
        let chain = state.withLock { s in
          defer { s.nextChain += 1 }
          s.scheduler.chains.open(s.nextChain)
          return s.nextChain
        }
        var target = StreamTarget(queueIndex: q.index, slot: slot, driverID: ObjectIdentifier(driver), chain: chain)
        target.tenant = tenant
        target.contextBytes = contextBytes
        return target
      }
    }
    state.withLock { s in Self.streamClosedLocked(&s, tenant: tenant, contextBytes: contextBytes) }
    throw .rejected(reason: .queueFull, retryAfterMilliseconds: 100)
  }

  private static func streamClosedLocked(_ s: inout State, tenant: String, contextBytes: Int) {
    s.streamContextBytes -= contextBytes
    let left = s.openStreams[tenant, default: 1] - 1
    s.openStreams[tenant] = left > 0 ? left : nil
  }

  /// Streams a tenant holds open (for tests and metrics).
  package func openStreamCount(tenant: String) -> Int { state.withLock { $0.openStreams[tenant, default: 0] } }

  /// Gives a stream's context back (after its last chunk, or when it is abandoned;
  /// the next STREAM_START on the slot reopens it cleanly).
  package func closeStream(_ target: StreamTarget) {
    // Slices still waiting (read ahead, then the stream failed or was abandoned) end here.
    var woken: [CheckedContinuation<Void, Never>] = []
    var slotFree = true
    let orphans = state.withLock { s -> [OutcomeSink] in
      s.scheduler.chains.end(target.chain)
      Self.streamClosedLocked(&s, tenant: target.tenant, contextBytes: target.contextBytes)
      // A slice still on the device (abandoned by a caller that gave up) keeps the slot until it completes.
      let running = s.jobs.values.count { $0.lease != nil && $0.request.stream?.chain == target.chain }
      if running > 0 {
        s.closingStreams[target.chain] = (target, running)
        slotFree = false
      }
      let ids = s.jobs.filter { $0.value.lease == nil && $0.value.request.stream?.chain == target.chain }.map(\.key)
      return ids.compactMap { id in
        guard let p = s.jobs[id] else { return nil }
        _ = s.scheduler.remove(id: id)
        s.forget(id)
        woken += leftQueueLocked(&s, p)
        return p.continuation
      }
    }
    for c in orphans { c.resume(returning: .failed(.cancelled)) }
    for w in woken { w.resume() }
    if slotFree { freeStreamSlot(target) }
  }

  private func freeStreamSlot(_ target: StreamTarget) {
    let driver = self.driver
    guard ObjectIdentifier(driver) == target.driverID, target.queueIndex < driver.queues.count else { return }
    driver.queues[target.queueIndex].closeStream(target.slot)
  }

  /// Stream context slots held back until their last slice completes (for tests and metrics).
  package var streamSlotsClosing: Int { state.withLock { $0.closingStreams.count } }

  private static func jobError(_ r: AdmissionRefusal, size: Int) -> JobError {
    switch r {
    case .tooManyQueuedJobs(let ns): .rejected(reason: .tenantQueueFull, retryAfterMilliseconds: max(1, ns / 1_000_000))
    case .tooManyQueuedBytes(let ns): .rejected(reason: .tenantQueuedBytes, retryAfterMilliseconds: max(1, ns / 1_000_000))
    case .rateLimited(let ns): .rejected(reason: .rateLimited, retryAfterMilliseconds: max(1, ns / 1_000_000))
    case .payloadTooLarge(let limit): .payloadOverTenantLimit(size: size, limit: limit)
    }
  }

  /// A waiting job's bytes leave the tenant's account.
  private static func leaveLocked(_ s: inout State, _ r: JobRequest) {
    s.admission.leave(tenant: r.tenant, bytes: r.chargedBytes)
  }

  /// A job left the wait queue: free its admission slot and wake stream readers.
  private func leftQueueLocked(_ s: inout State, _ p: Pending) -> [CheckedContinuation<Void, Never>] {
    Self.leaveLocked(&s, p.request)
    return takeRoomWaitersLocked(&s, tenant: p.request.tenant)
  }

  private func takeRoomWaitersLocked(_ s: inout State, tenant: String) -> [CheckedContinuation<Void, Never>] {
    guard s.admission.hasRoom(tenant: tenant) || s.shuttingDown, let waiters = s.roomWaiters.removeValue(forKey: tenant)
    else { return [] }
    return Array(waiters.values)
  }

  /// Suspends until `tenant` could queue another job (or the task is cancelled).
  /// Streaming calls use it to stop reading, so HTTP/2 flow control slows the client.
  package func waitForRoom(tenant: String) async {
    let waiter = state.withLock { s -> UInt64 in
      s.nextWaiterID += 1
      return s.nextWaiterID
    }
    await withTaskCancellationHandler {
      await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
        let ready = state.withLock { s -> Bool in
          if s.admission.hasRoom(tenant: tenant) || s.shuttingDown || Task.isCancelled { return true }
          s.roomWaiters[tenant, default: [:]][waiter] = c
          return false
        }
        if ready { c.resume() }
      }
    } onCancel: {
      let c = state.withLock { s in s.roomWaiters[tenant]?.removeValue(forKey: waiter) }
      c?.resume()
    }
  }

  /// Removes a waiting job, or abandons one already on the device; its caller
  /// gets `reason`. Idempotent.
  package func cancel(id: UInt64, reason: JobError = .cancelled) {
    var woken: [CheckedContinuation<Void, Never>] = []
    let cont = state.withLock { s -> OutcomeSink? in
      guard var p = s.jobs[id] else {
        // Cancelled before it was enqueued (or after it finished): remember briefly.
        if s.cancelledEarly.count > 4096 { s.cancelledEarly.removeAll() }
        s.cancelledEarly[id] = reason
        return nil
      }
      if p.lease == nil {
        _ = s.scheduler.remove(id: id)
        s.forget(id)
        woken = leftQueueLocked(&s, p)
        return p.continuation
      }
      guard !p.abandoned, let c = p.continuation else { return nil }
      p.abandoned = true
      p.continuation = nil
      s.jobs[id] = p
      return c
    }
    cont?.resume(returning: .failed(reason))
    for w in woken { w.resume() }
  }

  /// What one tenant has waiting now, and its limits.
  package func tenantState(_ tenant: String) -> (queuedJobs: Int, queuedBytes: Int, limits: TenantLimits) {
    state.withLock { s in
      (s.admission.queuedJobs(tenant), s.admission.queuedBytes(tenant), s.admission.limits(for: tenant))
    }
  }

  /// Snapshot for DescribeDevice and metrics.
  package var snapshot: DispatcherSnapshot {
    state.withLock { s in DispatcherSnapshot(queued: s.scheduler.count, inFlight: s.inFlight, inFlightCost: s.inFlightCost, retried: s.retried) }
  }

  // MARK: internals

  private func nanos(_ t: ContinuousClock.Instant) -> UInt64 { UInt64((t - epoch).nanosecondsClamped) }

  private func retryHintLocked(_ s: State) -> UInt64 {
    // A rough drain estimate: queued jobs over what the device keeps in flight, at ~1 ms a job.
    let depth = max(1, configuration.inFlightPerQueue * s.inFlight.count)
    return UInt64(max(10, min(5_000, s.scheduler.count / depth)))
  }

  /// Why no queue can take jobs now or soon (every one is isolated, stopped or
  /// dead); nil when at least one is healthy or recovering by itself.
  private var noQueueCanServe: String? {
    let queues = driver.queues
    guard !queues.contains(where: { $0.mayRecover }) else { return nil }
    let states = Set(queues.map(\.deviceState))
    if states == ["isolated"] { return "device isolated after repeated queue errors" }
    return "no device queue can serve: " + queues.map { "queue \($0.queueID) \($0.service.reason ?? $0.deviceState)" }.joined(separator: "; ")
  }

  private func expireOverdue() {
    if let reason = noQueueCanServe { failWaiting(.unavailable(reason)) }
    let now = clock.now
    var woken: [CheckedContinuation<Void, Never>] = []
    defer { for w in woken { w.resume() } }
    let expired = state.withLock { s -> [OutcomeSink] in
      var out: [OutcomeSink] = []
      for (id, p) in s.jobs where p.deadline <= now {
        if p.lease == nil {
          _ = s.scheduler.remove(id: id)
          if let c = p.continuation { out.append(c) }
          s.forget(id)
          woken += leftQueueLocked(&s, p)
        } else if !p.abandoned, let c = p.continuation {
          // On the device past its deadline: answer the caller now; the buffers
          // are freed when the completion finally arrives.
          s.jobs[id]?.abandoned = true
          s.jobs[id]?.continuation = nil
          out.append(c)
        }
      }
      return out
    }
    for c in expired { c.resume(returning: .failed(.deadlineExceeded)) }
  }

  /// Dispatches as many waiting jobs as the queues have room for.
  package func pump() {
    let enter = state.withLock { s -> Bool in
      if s.pumping {
        s.pumpAgain = true
        return false
      }
      s.pumping = true
      s.pumpAgain = false
      return true
    }
    guard enter else { return }
    while true {
      let work = takeDispatchable()
      if work.isEmpty {
        let done = state.withLock { s -> Bool in
          if s.pumpAgain {
            s.pumpAgain = false
            return false
          }
          s.pumping = false
          return true
        }
        if done { return }
        continue
      }
      submit(work)
    }
  }

  /// A job to publish. `relocate`: its staged payload lies in another queue's
  /// pool, to be copied into this lease's input (then freed).
  private typealias Work = (id: UInt64, lease: Lease, request: JobRequest, queue: DriverQueue, relocate: StagedInput?)

  /// Under the lock: pops jobs the device has room for and reserves their resources.
  private func takeDispatchable() -> [Work] {
    let now = clock.now
    var woken: [CheckedContinuation<Void, Never>] = []
    var failed: [(OutcomeSink, JobError)] = []
    defer {
      for w in woken { w.resume() }
      for (c, e) in failed { c.resume(returning: .failed(e)) }
    }
    guard detachedReasonBox.withLock({ $0 == nil }) else { return [] }
    let driver = self.driver
    return state.withLock { s -> [Work] in
      var work: [Work] = []
      let limit = configuration.maxBatch * driver.queues.count
      while work.count < limit, let next = s.scheduler.peek(), let p = s.jobs[next.id] {
        // Healthy queues with a free in-flight slot, least loaded first; the first
        // whose pool has room takes the job.
        // A queue of weight w keeps w jobs and w budgets in flight, so a shared
        // device's weighted round-robin always finds w descriptors to take in a row.
        let budget = UInt64(configuration.inFlightBudget.nanosecondsClamped)
        if let stream = p.request.stream {
          // A stream chunk runs on its own queue or not at all.
          guard ObjectIdentifier(driver) == stream.driverID, stream.queueIndex < driver.queues.count,
            driver.queues[stream.queueIndex].mayRecover
          else {
            _ = s.scheduler.pop(now: nanos(now))
            woken += leftQueueLocked(&s, p)
            let c = s.jobs[next.id]?.continuation
            s.forget(next.id)
            if let c { failed.append((c, .unavailable("the stream's device queue failed; restart the stream"))) }
            continue
          }
        }
        let staged = p.request.stagedInput
        if let staged, !staged.isStaged {
          // Unreachable: a waiting job's staged buffer is freed only when the job ends.
          _ = s.scheduler.pop(now: nanos(now))
          woken += leftQueueLocked(&s, p)
          s.forget(next.id)
          if let c = p.continuation { failed.append((c, .unavailable("the job's staged payload is gone"))) }
          continue
        }
        var candidates = driver.queues
          .filter {
            if let stream = p.request.stream, stream.queueIndex != $0.index { return false }
            let w = Int($0.weight)
            return $0.isHealthy && s.inFlight[$0.index] < max(configuration.inFlightPerQueue, w)
              && (s.inFlight[$0.index] < w || s.inFlightCost[$0.index] + next.cost <= budget * UInt64(w))
          }
          .sorted { s.inFlightCost[$0.index] < s.inFlightCost[$1.index] }
        if let staged, let i = candidates.firstIndex(where: { $0 === staged.queue }) {
          // Network lane: the payload already lies in this queue's pool; if the
          // queue has room the job runs there and nothing is copied. Otherwise it
          // goes where an ordinary job would, and the payload is copied over
          // (pool to pool: as many copies as without the lane, and the same
          // scheduling). A replaced driver's queue is never a candidate.
          candidates.insert(candidates.remove(at: i), at: 0)
        }
        let id = next.id
        var reserved: Lease?
        for queue in candidates {
          let adopt = staged?.queue === queue
          reserved = queue.reserve(
            srcLength: UInt32(p.request.payloadCount), dstCapacity: UInt32(p.request.outputCapacity),
            auxLength: UInt32(p.request.aux.count), midCapacity: UInt32(p.request.midCapacity), key: p.request.key,
            sensitive: p.request.sensitive, srcExternal: p.request.inputSpan, dstExternal: p.request.outputSpan,
            stagedInput: adopt ? staged : nil, srcSkip: adopt ? UInt32(p.request.stagedSkip) : 0,
            handler: { [weak self, queue] c in self?.complete(id: id, completion: c, queue: queue) })
          if reserved != nil { break }
        }
        // No room anywhere: the job keeps its place until slots or buffers free up.
        guard let lease = reserved else { break }
        var relocate: StagedInput?
        if let staged, staged.queue !== driver.queues[lease.queueIndex] {
          guard staged.beginRelocation() else {
            driver.queues[lease.queueIndex].release(lease)
            break  // unreachable (checked above, under this lock)
          }
          relocate = staged
        }
        let qi = lease.queueIndex
        _ = s.scheduler.pop(now: nanos(now))
        woken += leftQueueLocked(&s, p)
        s.inFlight[qi] += 1
        s.inFlightCost[qi] += next.cost
        s.jobs[id]?.lease = lease
        s.jobs[id]?.dispatchedAt = now
        work.append((id, lease, p.request, driver.queues[qi], relocate))
      }
      return work
    }
  }

  /// Outside the lock: copies inputs into the pools and publishes them, one doorbell per queue batch.
  private func submit(_ work: [Work]) {
    var byQueue: [ObjectIdentifier: [Work]] = [:]
    for w in work {
      let queue = w.queue
      let dst = queue.input(w.lease)
      if let from = w.relocate {
        // A staged payload from another queue's pool.
        let src = UnsafeRawBufferPointer(from.buffer)[w.request.stagedSkip...]
        if let d = dst.baseAddress, !src.isEmpty { d.copyMemory(from: UnsafeRawBufferPointer(rebasing: src).baseAddress!, byteCount: src.count) }
        from.endRelocation()
      } else if w.request.stagedInput == nil {  // an adopted staged payload is in place already
        w.request.inlineInput.withUnsafeBytes { src in
          if let s = src.baseAddress, let d = dst.baseAddress, src.count > 0 { d.copyMemory(from: s, byteCount: src.count) }
        }
      }
      if !w.request.aux.isEmpty {
        let aux = queue.aux(w.lease)
        w.request.aux.withUnsafeBytes { aux.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
      }
      byQueue[ObjectIdentifier(w.queue), default: []].append(w)
    }
    for (_, jobs) in byQueue {
      var start = 0
      while start < jobs.count {
        let chunk = jobs[start..<min(jobs.count, start + configuration.maxBatch)]
        state.withLock { s in
          for w in chunk {
            s.jobs[w.id]?.batchSize = chunk.count
            if (w.request.stagedInput == nil && w.request.inputSpan == nil) || w.relocate != nil {
              s.jobs[w.id]?.inputCopies += 1
            }
          }
        }
        batchHistogram.withLock { $0[min(64, chunk.count)] += 1 }
        jobs[0].queue.submit(chunk.map { (lease: $0.lease, steps: steps(of: $0.request)) })
        start += chunk.count
      }
    }
  }

  private func steps(of request: JobRequest) -> [DeviceStep] {
    guard configuration.verifyCompression else { return request.steps }
    return request.steps.map {
      var step = $0
      step.verify = step.opcode == .compress && step.streamSlot == 0
      return step
    }
  }

  /// Reaper thread: a completion arrived for job `id`.
  ///
  /// A keyed job keeps the gateway's copy of its key until it completes, so a
  /// retry can fill a key slot on another queue; a retried AEAD seal reuses its
  /// nonce with the same key and plaintext, which yields the same ciphertext and
  /// so reveals nothing.
  ///
  /// A queue-class failure (the queue's fault, not the job's) is retried once:
  /// the job goes back to the head of its tenant's line and runs on whichever
  /// queue is healthy next. A second failure reaches the caller as UNAVAILABLE.
  private func complete(id: UInt64, completion: Completion, queue: DriverQueue) {
    let current = driver
    let attached = isAttached
    var freedSlot: StreamTarget?
    defer { if let freedSlot { freeStreamSlot(freedSlot) } }
    let delivery = state.withLock { s -> (OutcomeSink, Outcome)? in
      guard var p = s.jobs.removeValue(forKey: id), let lease = p.lease else { return nil }
      s.heldBytes -= p.request.payloadCount
      freedSlot = s.leftDevice(p)
      // Counters belong to the current driver; a job of a replaced one no longer counts.
      if lease.queueIndex < current.queues.count && current.queues[lease.queueIndex] === queue {
        s.inFlight[lease.queueIndex] -= 1
        s.inFlightCost[lease.queueIndex] -= min(s.inFlightCost[lease.queueIndex], p.job.cost)
      }
      if completion.status == .ok {
        s.cost.observe(p.jobClass, bytes: p.request.deviceInputBytes, engineNanoseconds: completion.engineNanoseconds)
      }
      s.scheduler.complete(p.job, actualCost: completion.engineNanoseconds, now: nanos(clock.now))
      if p.job.chain != 0 {
        // The stream's next slice may go now (or this one's continuation, or, after
        // a failure, nothing: the stream ends and its waiting slices are dropped).
        switch completion.status {
        case .ok: s.scheduler.chains.admit(p.job.chain, sequence: p.job.sequence + 1)
        case .moreOutput: s.scheduler.chains.admit(p.job.chain, sequence: p.job.sequence)
        default: s.scheduler.chains.block(p.job.chain)
        }
      }
      if p.abandoned || p.continuation == nil {
        queue.release(lease, keepAlive: p.request.retain)
        return nil
      }
      if completion.status.errorClass == .queue && p.retries == 0 && attached && !s.shuttingDown
        && p.request.stream == nil
        && current.queues.contains(where: { $0.mayRecover })
      {
        // The device is done with the buffers (or the queue stays out of service
        // until a reset proves it is), so they can go back to the pool now. A
        // staged payload goes with them: the retry takes a copy of it.
        if p.request.stagedInput != nil {
          let src = UnsafeRawBufferPointer(queue.input(lease))
          p.request.input = .inline(Data(UnsafeRawBufferPointer(rebasing: src[Int(lease.srcSkip)...])))
          p.inputCopies += 1
        }
        queue.release(lease, keepAlive: p.request.retain)
        p.lease = nil
        p.dispatchedAt = nil
        p.retries += 1
        s.retried += 1
        s.admission.reenter(tenant: p.request.tenant, bytes: p.request.chargedBytes)
        s.jobs[id] = p
        s.heldBytes += p.request.payloadCount
        s.scheduler.enqueue(p.job, now: nanos(clock.now))
        logger.warning(
          "retrying job after a queue error",
          metadata: ["job": "\(id)", "queue": "\(queue.queueID)", "error": "\(completion.detail ?? "\(completion.status)")"])
        return nil
      }
      return (p.continuation!, .completed(
          completion, lease, queue, enqueuedAt: p.enqueuedAt, dispatchedAt: p.dispatchedAt ?? p.enqueuedAt,
          batchSize: p.batchSize, inputCopies: p.inputCopies))
    }
    if let (c, o) = delivery { c.resume(returning: o) }
  }

  /// Fails every job still waiting for the device.
  private func failWaiting(_ error: JobError) {
    let waiting = state.withLock { s -> [OutcomeSink] in
      var out: [OutcomeSink] = []
      for (id, p) in s.jobs where p.lease == nil {
        _ = s.scheduler.remove(id: id)
        if let c = p.continuation { out.append(c) }
        s.forget(id)
        Self.leaveLocked(&s, p.request)
      }
      return out
    }
    for c in waiting { c.resume(returning: .failed(error)) }
  }

  /// The device is gone (daemon died or its channel broke): jobs on it fail with
  /// UNAVAILABLE now, waiting jobs too, and new jobs fail at once until `attach`.
  package func detach(reason: String) {
    detachedReasonBox.withLock { $0 = reason }
    let old = driver
    old.failAll(reason: reason)  // completions with DEVICE_FAULT reach their callers as UNAVAILABLE
    old.stop()
    failWaiting(.unavailable(reason))
    logger.error("device detached", metadata: ["reason": "\(reason)"])
  }

  /// Moves to another device without refusing calls (software fallback and
  /// back): waiting jobs stay queued for the new driver. When the old device is
  /// gone (`oldIsGone`), its in-flight jobs fail as queue errors and so are
  /// retried once on the new one; otherwise they finish where they are and the
  /// old driver keeps running for them (and for the next failover).
  /// `degraded` says why the gateway runs on a stand-in device (nil: it does not).
  package func failover(to newDriver: DeviceDriver, oldIsGone: Bool, reason: String, degraded: String?) {
    let old = driver
    degradedReason.withLock { $0 = degraded }
    attach(newDriver)
    if old !== newDriver && oldIsGone {
      old.failAll(reason: reason)
      old.stop()
    }
    if let degraded {
      logger.warning("serving degraded", metadata: ["reason": "\(degraded)"])
    } else {
      logger.notice("no longer degraded")
    }
  }

  /// Why the gateway serves from a stand-in (software fallback) device; nil when it does not.
  package var degraded: String? { degradedReason.withLock { $0 } }

  /// Uses a new driver (the device came back) and accepts jobs again.
  package func attach(_ newDriver: DeviceDriver) {
    state.withLock { s in
      s.inFlight = Array(repeating: 0, count: newDriver.queues.count)
      s.inFlightCost = Array(repeating: 0, count: newDriver.queues.count)
    }
    for q in newDriver.queues { q.setStagingZone(bytes: configuration.stagingZone(poolCapacity: q.poolCapacity)) }
    driverRef.withLock { $0 = newDriver }
    newDriver.setAfterReap { [weak self] in self?.pump() }
    newDriver.start()
    detachedReasonBox.withLock { $0 = nil }
    logger.notice("device attached", metadata: ["queues": "\(newDriver.queues.count)"])
    pump()
  }

  package var isAttached: Bool { detachedReasonBox.withLock { $0 == nil } }

  /// Why the device is detached; nil while attached.
  package var detachedReason: String? { detachedReasonBox.withLock { $0 } }

  /// Batch sizes seen so far: index = descriptors per doorbell.
  package var batchSizeCounts: [Int] { batchHistogram.withLock { $0 } }
}

/// How one job ended, for metrics.
package struct JobReport: Sendable {
  package var tenant: String
  /// The first step's opcode (metrics name it once per label set).
  package var opcode: DeviceOpcode
  /// The first step's algorithm.
  package var algorithm: DeviceAlgorithm
  /// The admission reason, when admission refused the job.
  package var rejection: String?
  /// "ok", or `JobError.kind`.
  package var outcome: String
  /// Set for jobs that completed.
  package var statistics: JobStatistics?

  init(request: JobRequest, outcome: String, statistics: JobStatistics?) {
    tenant = request.tenant
    opcode = request.opcode
    algorithm = request.algorithm
    self.outcome = outcome
    self.statistics = statistics
  }
}

package struct DispatcherSnapshot: Sendable {
  package var queued: Int
  package var inFlight: [Int]
  /// Estimated device time (ns) of the jobs in flight, per queue: what the in-flight budget bounds.
  package var inFlightCost: [UInt64]
  /// Jobs put back once after a queue error.
  package var retried: UInt64
}

extension Duration {
  var nanosecondsClamped: Int64 {
    let (s, a) = components
    if s > Int64.max / 1_000_000_000 { return .max }
    return max(0, s * 1_000_000_000 + a / 1_000_000_000)
  }
}
