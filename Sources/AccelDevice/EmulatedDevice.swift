internal import AccelABI
internal import CAccelABI
internal import CAccelEngines
internal import Foundation
internal import Synchronization
internal import CAccelSys

/// A software accelerator behind a hardware interface.
///
/// Each queue is a memfd region (see `accel_abi.h`). Engine threads poll the
/// submission rings, copy each descriptor into private memory (as a DMA fetch
/// would, so a peer rewriting it later cannot change what was validated), run
/// the job in place on the data pool and post a completion. Idle engines spin
/// for `idleSpin`, then set `sq_need_wakeup` and park on the doorbell futexes.
public final class EmulatedDevice: @unchecked Sendable {
  public let configuration: DeviceConfiguration
  public let engines: [EngineStats]

  /// Live queues. Engines work from a snapshot and re-read it when `queueGeneration` moves.
  private let queueSet = Mutex<[DeviceQueue]>([])
  private let queueGeneration = Atomic<UInt64>(0)
  /// The next queue id to try. Held while a queue is allocated, so the id choice,
  /// the budget check and the append happen as one step.
  private let allocation: Mutex<UInt32>
  /// Engines also park on this word, so adding or removing a queue wakes them.
  private let controlWord = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
  private let controlDoorbell: SharedWord

  /// Most queues a device holds: an idle engine parks on every queue's doorbell
  /// and the control word with one futex_waitv, which takes at most 128 words
  /// (issue 17, finding 17: with 128 queues one doorbell was never waited on).
  public static let maxQueues = Int(ACCEL_FUTEX_WAITV_MAX) - 1

  /// The queues currently allocated.
  public var queues: [DeviceQueue] { queueSet.withLock { $0 } }
  /// Bytes of all live queue regions (accounted against `memoryBudget`).
  public var regionBytes: UInt64 { queues.reduce(0) { $0 + $1.region.layout.regionSize } }
  /// Bytes one more queue region with the configured geometry takes.
  public var queueRegionBytes: UInt64 {
    (try? RegionLayout(
      sqEntries: configuration.sqEntries, cqEntries: configuration.sqEntries, dataPoolBytes: configuration.dataPoolBytes,
      keySlots: configuration.keySlots))?.regionSize ?? 0
  }

  private let running = Atomic<Bool>(false)
  /// The one idle spinner, the parked engines, and the need-wakeup flags they imply.
  private let wakeups = EngineWakeups()
  private let exited = DispatchGroup()
  /// Faults to inject; `faultsOn` keeps the per-job check to one relaxed load when off.
  private let faultPlan: Mutex<FaultInjection>
  private let faultsOn = Atomic<Bool>(false)
  private let faultTick = Atomic<UInt64>(0)
  private let isolation = Mutex(IsolationState())
  private let isolated = Atomic<Bool>(false)
  private let counters = DeviceCounters()
  private let eventHandler: Mutex<CallbackBox<String>?> = Mutex(nil)
  /// Busy engines bump every queue's heartbeat at least this often (ns); parked ones on each wake-up.
  static let heartbeatInterval: UInt64 = 10_000_000

  /// Builds the device with `configuration.queueCount` queues allocated up front
  /// (the embedded layout); a standalone daemon starts with none and allocates
  /// queues as gateways ask for them.
  public init(configuration: DeviceConfiguration = .defaults) throws(DeviceError) {
    guard configuration.queueCount >= 0, configuration.queueCount <= Self.maxQueues, configuration.engineCount >= 1 else {
      throw .invalidConfiguration("need 0...\(Self.maxQueues) queues and at least one engine")
    }
    self.configuration = configuration
    allocation = Mutex(configuration.firstQueueID)
    faultPlan = Mutex(configuration.faults)
    faultsOn.store(configuration.faults.mode != .none, ordering: .relaxed)
    controlWord.initialize(to: 0)
    controlDoorbell = SharedWord(controlWord)
    self.engines = (0..<configuration.engineCount).map { EngineStats(id: $0) }
    for i in 0..<configuration.queueCount {
      let weight = i < configuration.queueWeights.count ? max(1, configuration.queueWeights[i]) : 1
      _ = try allocateQueue(weight: weight)
    }
  }

  deinit {
    stop()
    controlWord.deallocate()
  }

  /// Creates a queue region with the configured geometry and adds it to arbitration.
  /// - Throws: `.budget` when the region would exceed `memoryBudget`.
  public func allocateQueue(weight: UInt32, dataPoolBytes: UInt64? = nil) throws(DeviceError) -> DeviceQueue {
    try allocation.withLock { (next: inout UInt32) throws(DeviceError) -> DeviceQueue in
      try allocateQueueLocked(weight: weight, dataPoolBytes: dataPoolBytes, next: &next)
    }
  }

  /// Moves the id counter (tests: to meet live ids after a wrap without 2^32 allocations).
  package func setNextQueueID(_ id: UInt32) { allocation.withLock { $0 = id } }

  private func allocateQueueLocked(weight: UInt32, dataPoolBytes: UInt64?, next: inout UInt32) throws(DeviceError)
    -> DeviceQueue
  {
    let layout: RegionLayout
    do {
      layout = try RegionLayout(
        sqEntries: configuration.sqEntries, cqEntries: configuration.sqEntries,
        dataPoolBytes: dataPoolBytes ?? configuration.dataPoolBytes, keySlots: configuration.keySlots)
    } catch { throw .invalidConfiguration(error.description) }
    guard queues.count < Self.maxQueues else { throw .budget("the device has \(Self.maxQueues) queues already") }
    if let budget = configuration.memoryBudget, regionBytes + layout.regionSize > budget {
      throw .budget("queue of \(layout.regionSize) bytes exceeds the device memory budget (\(regionBytes) of \(budget) in use)")
    }
    // Ids wrap at 2^32; a live queue's id is never handed out again (there are
    // at most `maxQueues` live queues, so this skips at most that many ids).
    let live = Set(queues.map(\.id))
    while live.contains(next) { next &+= 1 }
    let id = next
    next &+= 1
    let queue: DeviceQueue
    do {
      let region = try QueueRegion.create(layout: layout, queueID: id, weight: max(1, weight), name: "accelgate-q\(id)")
      queue = DeviceQueue(region: region, doorbellFD: configuration.eventfdDoorbells ? accel_eventfd_create() : -1)
    } catch { throw .region(error.description) }
    if isolated.load(ordering: .acquiring) { queue.setIsolated(true) }
    // The driver rings a new queue until the engines' next snapshot sets its flag.
    queue.sqNeedWakeup.storeSeqCst(1)
    queueSet.withLock { $0.append(queue) }
    queuesChanged()
    return queue
  }

  /// Stops a queue and removes it from arbitration. Its region is unmapped once
  /// no engine holds it; descriptors still in its ring are never run.
  public func releaseQueue(id: UInt32) {
    let removed = queueSet.withLock { qs -> DeviceQueue? in
      guard let i = qs.firstIndex(where: { $0.id == id }) else { return nil }
      return qs.remove(at: i)
    }
    guard let removed else { return }
    removed.stop()
    queuesChanged()
  }

  private func queuesChanged() {
    queueGeneration.add(1, ordering: .sequentiallyConsistent)
    controlDoorbell.fetchAdd(1)
    controlDoorbell.wake()
  }

  /// Starts the engine threads. Idempotent.
  public func start() {
    guard running.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged else {
      return
    }
    for stats in engines {
      exited.enter()
      let thread = Thread { [self] in
        Thread.current.name = "accel-engine-\(stats.id)"
        self.engineLoop(stats)
        self.exited.leave()
      }
      thread.start()
    }
  }

  /// Stops the engines and waits for them to exit. Queued descriptors stay in the rings.
  public func stop() {
    guard running.compareExchange(expected: true, desired: false, ordering: .sequentiallyConsistent).exchanged else {
      return
    }
    controlDoorbell.fetchAdd(1)
    controlDoorbell.wake()
    exited.wait()
  }

  public var isRunning: Bool { running.load(ordering: .relaxed) }

  // MARK: faults, errors and isolation

  /// Replaces the faults being injected (`.none` stops injecting; a stalled engine resumes).
  public func injectFaults(_ plan: FaultInjection) {
    faultPlan.withLock { $0 = plan }
    faultsOn.store(plan.mode != .none, ordering: .releasing)
    emit(plan.mode == .none ? "fault injection off" : "injecting faults: \(plan)")
  }

  /// The faults being injected.
  public var faults: FaultInjection { faultPlan.withLock { $0 } }

  /// Called with a one-line description of device events (errors, isolation).
  public func setEventHandler(_ handler: @escaping @Sendable (String) -> Void) {
    eventHandler.withLock { $0 = CallbackBox(handler) }
  }

  private func emit(_ event: String) { eventHandler.withLock { $0 }?.call(event) }

  /// Whether the device isolated itself after repeated queue errors.
  public var isIsolated: Bool { isolated.load(ordering: .acquiring) }

  /// Error and recovery counters.
  public var errorStatistics: DeviceErrorStatistics {
    DeviceErrorStatistics(
      queueErrors: counters.queueErrors.load(ordering: .relaxed), resets: counters.resets.load(ordering: .relaxed),
      isolations: counters.isolations.load(ordering: .relaxed),
      injectedFaults: counters.injected.load(ordering: .relaxed), isolated: isIsolated)
  }

  /// Ends an isolation now (an operator's action; also done after `isolationCooldown`).
  /// Queues still in error stay so until their drivers reset them.
  public func liftIsolation() {
    let was = isolation.withLock { s -> Bool in
      defer {
        s.isolatedAt = nil
        s.errorTimes = []
      }
      return s.isolatedAt != nil
    }
    guard was else { return }
    isolated.store(false, ordering: .releasing)
    for q in queues { q.setIsolated(false) }
    emit("device isolation lifted")
    queuesChanged()
  }

  /// Counts a queue error; isolates the device when the window holds too many.
  private func recordQueueError(now: UInt64, queue: UInt32, status: DeviceStatus) {
    counters.queueErrors.add(1, ordering: .relaxed)
    let window = configuration.isolationWindow.nanoseconds
    let isolate = isolation.withLock { s -> Bool in
      s.errorTimes.append(now)
      s.errorTimes.removeAll { now &- $0 > window }
      guard s.isolatedAt == nil, s.errorTimes.count >= max(1, configuration.isolationThreshold) else { return false }
      s.isolatedAt = now
      return true
    }
    guard isolate else { return }
    counters.isolations.add(1, ordering: .relaxed)
    isolated.store(true, ordering: .releasing)
    for q in queues { q.setIsolated(true) }
    emit(
      "device isolated after \(configuration.isolationThreshold) queue errors within \(configuration.isolationWindow) (last: queue \(queue), \(status))"
    )
  }

  /// Resets the driver asked for, and the end of an isolation's cool-down.
  private func maintain(_ queues: [DeviceQueue], now: UInt64) {
    for q in queues {
      // A reset is the driver's request, so a peer can ask for as many as it likes:
      // it costs that peer its own queue's in-flight jobs and never counts toward
      // isolation. The device-side faults a driver recovers from by a reset (lost,
      // malformed or stalled completions) were counted when the device caused them.
      guard q.serviceReset() != nil else { continue }
      counters.resets.add(1, ordering: .relaxed)
    }
    if isolated.load(ordering: .relaxed), let cooldown = configuration.isolationCooldown {
      let since = isolation.withLock { $0.isolatedAt }
      if let since, now &- since >= cooldown.nanoseconds { liftIsolation() }
    }
  }

  /// The fault to inject into the next job of `q`, if any.
  private func nextFault(for q: DeviceQueue) -> FaultInjection? {
    guard faultsOn.load(ordering: .relaxed) else { return nil }
    let plan = faultPlan.withLock { $0 }
    guard plan.mode != .none, plan.queue == nil || plan.queue == q.id else { return nil }
    guard faultTick.add(1, ordering: .relaxed).newValue % UInt64(plan.every) == 0 else { return nil }
    counters.injected.add(1, ordering: .relaxed)
    return plan
  }

  /// A new file descriptor for queue `index`'s memfd, for a driver to map.
  public func exportQueue(_ index: Int) -> Int32 { dup(queues[index].region.fd) }

  /// Attaches a client's memory to queue `queueID` under `id` (ABI 1.4): the
  /// device maps the memfd after checking its shrink seal and size. Takes
  /// ownership of `fd`.
  public func attachExternalRegion(queueID: UInt32, id: UInt16, fd: Int32, size: UInt64) throws(DeviceError) {
    guard let q = queues.first(where: { $0.id == queueID }) else {
      close(fd)
      throw .invalidConfiguration("no queue \(queueID)")
    }
    let region: ExternalRegion
    do { region = try ExternalRegion.map(fd: fd, claimedSize: size) } catch {
      throw .invalidConfiguration("region \(id): \(error)")
    }
    guard q.attachExternal(region, id: id) else { throw .invalidConfiguration("region id \(id) is in use or out of range") }
  }

  /// Detaches a client region from a queue; the pages are unmapped when the last job using them ends.
  @discardableResult
  public func detachExternalRegion(queueID: UInt32, id: UInt16) -> Bool {
    queues.first { $0.id == queueID }?.detachExternal(id) ?? false
  }

  /// Queue `index`'s eventfd doorbell in the comparison mode (not duplicated; -1 otherwise).
  public func doorbellEventFD(_ index: Int) -> Int32 { queues[index].doorbellFD }

  /// A new file descriptor for the queue with `id`, or nil.
  public func exportQueue(id: UInt32) -> Int32? { queues.first { $0.id == id }.map { dup($0.region.fd) } }

  // MARK: engine loop

  private func engineLoop(_ stats: EngineStats) {
    guard let ctx = accel_engine_create() else { return }
    defer { accel_engine_destroy(ctx) }
    let scratch = EngineScratch()
    let spinNs = configuration.idleSpin.nanoseconds
    let capBytesPerNs = configuration.engineThroughputCapMBps.map { $0 * 1e6 / 1e9 }
    // Weighted round-robin: a queue may take `weight` descriptors in a row.
    var generation = queueGeneration.load(ordering: .sequentiallyConsistent)
    var queues = self.queues
    var cursor = queues.isEmpty ? 0 : stats.id % queues.count
    var credit = queues.isEmpty ? 1 : queues[cursor].weight
    var idle = IdleSpin(spinNanoseconds: spinNs)
    /// Whether this engine holds the one spinning place.
    var spinner = false
    /// Whether this engine counts as attentive (`WakeupLedger`): spinning, or on a short job.
    var attentive = false
    var lastBeat = idle.lastWork
    /// Heartbeats and upkeep, on the rounds that read the clock.
    func upkeep(_ now: UInt64) {
      guard now &- lastBeat > Self.heartbeatInterval else { return }
      for q in queues { q.heartbeat.fetchAdd(1) }
      lastBeat = now
      maintain(queues, now: now)
    }
    func attend(_ yes: Bool) {
      guard yes != attentive else { return }
      attentive = yes
      if yes { wakeups.attend(queues) } else { wakeups.leave(queues) }
    }

    while running.load(ordering: .relaxed) {
      let current = queueGeneration.load(ordering: .sequentiallyConsistent)
      if current != generation {
        generation = current
        queues = self.queues
        cursor = queues.isEmpty ? 0 : cursor % queues.count
        credit = queues.isEmpty ? 1 : queues[cursor].weight
        wakeups.sync(queues)
      }
      var didWork = false
      for step in 0..<queues.count {
        let q = queues[(cursor + step) % queues.count]
        guard let sqe = q.fetch() else { continue }  // one job: a descriptor or a chain
        if spinner {
          spinner = false
          wakeups.releaseSpinner()
        }
        let long = sqe.first.map { wakeups.policy.isLong(inputBytes: $0.src_length) } ?? false
        attend(!long)
        wakeups.handOff(queues, tookLong: long)
        if step != 0 {
          cursor = (cursor + step) % queues.count
          credit = q.weight
        }
        process(sqe, on: q, ctx: ctx, scratch: scratch, stats: stats, capBytesPerNs: capBytesPerNs)
        credit -= 1
        if credit == 0 {
          cursor = (cursor + 1) % queues.count
          credit = queues[cursor].weight
        }
        didWork = true
        break
      }
      if didWork {
        let now = SharedMemory.nowNanoseconds()
        idle.worked(now: now)
        upkeep(now)
        continue
      }
      if !spinner && wakeups.claimSpinner() {
        spinner = true
        attend(true)
        idle.worked()
      }
      if spinner {
        if idle.keepSpinning(clock: upkeep) { continue }
        spinner = false
        wakeups.releaseSpinner()
      }
      // Leaving the rings: raise the flags if no one else watches them, then park
      // (which looks for work once more before it sleeps).
      attend(false)
      if configuration.eventfdDoorbells {
        let fds = queues.map(\.doorbellFD).filter { $0 >= 0 }
        stats.parks.add(1, ordering: .relaxed)
        _ = accel_eventfd_wait_any(fds, Int32(fds.count), configuration.parkTimeout.nanoseconds)
        idle.worked()
      } else {
        park(stats, queues: queues, generation: generation)
        idle.worked()
        maintain(queues, now: idle.lastWork)
      }
    }
  }

  /// Parks on every queue's doorbell. The Dekker pair with the driver is:
  /// engine stores `sq_need_wakeup = 1`, fence, loads `sq_tail`;
  /// driver stores `sq_tail`, fence, loads `sq_need_wakeup`.
  /// One of them always sees the other's store, so no wake-up is lost.
  /// Also parks on the device's control word, so a queue added or removed (which
  /// bumps it) wakes the engine to take a fresh snapshot.
  private func park(_ stats: EngineStats, queues: [DeviceQueue], generation: UInt64) {
    let (bed, reserveSeen) = wakeups.parking(queues)
    let seenControl = controlDoorbell.loadAcquire()
    let seen = queues.map { $0.sqDoorbell.loadAcquire() }
    let pending = queues.contains { $0.hasPendingWork }
    if !pending && running.load(ordering: .relaxed) && queueGeneration.load(ordering: .sequentiallyConsistent) == generation {
      stats.parks.add(1, ordering: .relaxed)
      switch bed {
      case .doorbells:
        SharedMemory.waitAny(
          [controlDoorbell.pointer] + queues.map { $0.sqDoorbell.pointer }, expected: [seenControl] + seen,
          timeoutNanoseconds: configuration.parkTimeout.nanoseconds)
      case .reserve:
        SharedMemory.waitAny(
          [controlDoorbell.pointer, wakeups.reserve.pointer], expected: [seenControl, reserveSeen],
          timeoutNanoseconds: configuration.parkTimeout.nanoseconds)
      }
    }
    for q in queues { q.heartbeat.fetchAdd(1) }
    wakeups.woke(queues, from: bed)
  }

  private func process(
    _ chain: [accel_sqe], on q: DeviceQueue, ctx: OpaquePointer, scratch: EngineScratch, stats: EngineStats,
    capBytesPerNs: Double?
  ) {
    let start = SharedMemory.nowNanoseconds()
    defer { scratch.trim() }
    // A queue in error or isolated drains its ring without running anything.
    let runnable = q.isRunnable
    let fault = runnable ? nextFault(for: q) : nil
    switch fault?.mode {
    case .lost?, .corruptCompletion?, .stall?:
      // Device-side faults the driver will only see as a missing or malformed
      // completion (and recover from with a reset, which itself never counts).
      recordQueueError(now: start, queue: q.id, status: .deviceFault)
    default:
      break
    }
    switch fault?.mode {
    case .stall?:
      // A hung engine: it holds the job (and so blocks the queue's reset) until the fault is cleared.
      while running.load(ordering: .relaxed) && faults.mode == .stall { SharedMemory.sleep(nanoseconds: 2_000_000) }
    case .latency?:
      pause(nanoseconds: fault!.latency.nanoseconds)
    default:
      break
    }
    var status = DeviceStatus.ok
    var produced: UInt32 = 0
    var consumed: UInt32 = 0
    var inputBytes: UInt64 = 0
    if !runnable {
      status = .queueStopped
    } else if fault?.mode == .error {
      status = .deviceFault
    } else if chain.last!.flags & UInt8(ACCEL_SQE_F_CHAIN) != 0 {
      status = .badParams  // cut short
    }
    for (i, sqe) in chain.enumerated() where status == .ok {
      // External regions (1.4) are resolved once per descriptor and held for the job.
      let srcExt = sqe.src_region == 0 ? nil : q.external(sqe.src_region)
      let dstExt = sqe.dst_region == 0 ? nil : (sqe.dst_region == sqe.src_region ? srcExt : q.external(sqe.dst_region))
      status = DescriptorRules.validate(sqe, layout: q.region.layout) { id in
        id == sqe.src_region ? srcExt?.size : id == sqe.dst_region ? dstExt?.size : nil
      }
      guard status == .ok else { break }
      // A NOP touches no buffer, and its offsets are not validated: never turn them
      // into pointers (an offset past Int.max trapped the device; found by
      // fuzz/ring hostile-driver).
      if sqe.opcode == UInt8(ACCEL_OP_NOP.rawValue) {
        (produced, consumed) = (0, 0)
        continue
      }
      let buffers = Buffers(
        src: srcExt.map { $0.base + Int(sqe.src_offset) } ?? q.region.bytes(at: sqe.src_offset),
        dst: dstExt.map { $0.base + Int(sqe.dst_offset) } ?? q.region.bytes(at: sqe.dst_offset))
      var length = sqe.src_length
      if i > 0 {
        // A follower reads what its predecessor wrote.
        guard sqe.src_offset == chain[i - 1].dst_offset, sqe.src_region == chain[i - 1].dst_region,
          produced <= sqe.src_length
        else {
          status = .badParams
          break
        }
        length = produced
      }
      inputBytes += UInt64(length)
      let corrupt = fault?.mode == .corruptOutput && i == chain.count - 1
      if sqe.flags & UInt8(ACCEL_SQE_F_VERIFY) != 0 {
        (status, produced, consumed) = withExtendedLifetime((srcExt, dstExt)) {
          runVerified(sqe, inputLength: length, buffers: buffers, on: q, ctx: ctx, scratch: scratch, corrupt: corrupt)
        }
        stats.verified.add(1, ordering: .relaxed)
        guard status == .ok else { break }
        continue
      }
      (status, produced, consumed) = withExtendedLifetime((srcExt, dstExt)) {
        run(sqe, inputLength: length, buffers: buffers, on: q, ctx: ctx)
      }
      guard status == .ok else { break }
      if corrupt && produced > 0 {
        // Silent corruption of the result.
        (buffers.dst + Int(produced / 2)).assumingMemoryBound(to: UInt8.self).pointee ^= 0x5A
      }
    }
    var elapsed = SharedMemory.nowNanoseconds() &- start
    if let cap = capBytesPerNs, cap > 0, inputBytes > 0 {
      let modeled = UInt64(Double(inputBytes) / cap)
      if modeled > elapsed {
        pause(nanoseconds: modeled - elapsed)
        elapsed = modeled
      }
    }
    stats.jobs.add(1, ordering: .relaxed)
    stats.busyNanoseconds.add(elapsed, ordering: .relaxed)
    // Queue-class errors put the queue in error before the completion is
    // visible, so a driver retrying the job already sees this queue unhealthy.
    if runnable && status.errorClass == .queue {
      q.markError(status)
      recordQueueError(now: SharedMemory.nowNanoseconds(), queue: q.id, status: status)
    }
    var cqe = accel_cqe()
    cqe.cookie = chain.last!.cookie
    cqe.status = status.rawValue
    cqe.error_class = status.errorClass.rawValue
    cqe.produced = status == .ok || status == .moreOutput ? produced : 0
    cqe.consumed = consumed
    cqe.engine_id = UInt16(truncatingIfNeeded: stats.id)
    cqe.engine_ns = elapsed
    switch fault?.mode {
    case .lost?:
      q.finishedWithoutPosting()
      return
    case .corruptCompletion?:
      cqe.status = 0xBEEF
      cqe.produced = 0xFFFF_FFF0
    default:
      break
    }
    q.post(cqe, isRunning: { self.running.load(ordering: .relaxed) })
  }

  /// Sleeps an engine (modelled slowness, injected latency) in slices, so
  /// `stop()` never waits long for it.
  private func pause(nanoseconds: UInt64) {
    let end = SharedMemory.nowNanoseconds() &+ nanoseconds
    while running.load(ordering: .relaxed) {
      let now = SharedMemory.nowNanoseconds()
      guard now < end else { return }
      SharedMemory.sleep(nanoseconds: min(end - now, 5_000_000))
    }
  }

  /// Compress-and-verify on private memory (see `EngineScratch`): snapshots the
  /// input, compresses the snapshot into scratch, inflates that and compares it
  /// with the snapshot, and only then copies the result to the destination. What
  /// the peer does to its shared buffers meanwhile cannot change the verdict, so
  /// VERIFY_FAILED always means the device itself got it wrong.
  /// `corrupt` (fault injection) flips a byte of the result before verification.
  private func runVerified(
    _ sqe: accel_sqe, inputLength: UInt32, buffers: Buffers, on q: DeviceQueue, ctx: OpaquePointer,
    scratch: EngineScratch, corrupt: Bool
  ) -> (DeviceStatus, UInt32, UInt32) {
    guard sqe.opcode == DeviceOpcode.compress.rawValue, sqe.flags & UInt8(ACCEL_SQE_F_STREAM) == 0 else {
      return (.badParams, 0, 0)  // validation admits VERIFY on one-shot compression only
    }
    guard let (input, output) = scratch.reserve(inputBytes: Int(inputLength), outputBytes: Int(sqe.dst_capacity)) else {
      return (.engineError, 0, 0)
    }
    if inputLength > 0 { input.copyMemory(from: buffers.src, byteCount: Int(inputLength)) }
    var (status, produced, consumed) = run(
      sqe, inputLength: inputLength, buffers: Buffers(src: input, dst: output), on: q, ctx: ctx)
    guard status == .ok else { return (status, produced, consumed) }
    if corrupt && produced > 0 { (output + Int(produced / 2)).assumingMemoryBound(to: UInt8.self).pointee ^= 0x5A }
    let raw = accel_engine_verify(
      ctx, sqe.algorithm, output.assumingMemoryBound(to: UInt8.self), produced,
      input.assumingMemoryBound(to: UInt8.self), inputLength)
    status = DeviceStatus(rawValue: raw) ?? .engineError
    guard status == .ok else { return (status, 0, consumed) }
    if produced > 0 { buffers.dst.copyMemory(from: output, byteCount: Int(produced)) }
    return (.ok, produced, consumed)
  }

  /// A validated step's input and output: in the queue's data pool, or in a
  /// client's attached region (1.4).
  struct Buffers {
    let src: UnsafeMutableRawPointer
    let dst: UnsafeMutableRawPointer
  }

  /// Runs one validated step in place, on the data pool or the client's pages.
  private func run(_ sqe: accel_sqe, inputLength: UInt32, buffers: Buffers, on q: DeviceQueue, ctx: OpaquePointer)
    -> (DeviceStatus, UInt32, UInt32)
  {
    let region = q.region
    let src = UnsafePointer(buffers.src.assumingMemoryBound(to: UInt8.self))
    let dst = buffers.dst.assumingMemoryBound(to: UInt8.self)
    var produced: UInt32 = 0
    var consumed: UInt32 = 0
    var raw: UInt16
    if sqe.flags & UInt8(ACCEL_SQE_F_STREAM) != 0 {
      // A stream chunk (1.3): the context's own engine state, not this engine's.
      guard let stream = q.streamContext(sqe) else { return (.invalidDescriptor, 0, 0) }
      let final: Int32 = sqe.flags & UInt8(ACCEL_SQE_F_STREAM_FINAL) != 0 ? 1 : 0
      raw = accel_stream_process(stream.raw, src, inputLength, final, dst, sqe.dst_capacity, &produced, &consumed)
      let st = DeviceStatus(rawValue: raw) ?? .engineError
      q.streamChunkDone(sqe.stream_ctx, stream, close: (st == .ok && final == 1) || (st != .ok && st != .moreOutput))
      if produced > sqe.dst_capacity { return (.engineError, 0, 0) }
      return (st, st == .ok || st == .moreOutput ? produced : 0, consumed)
    }
    switch DeviceOpcode(rawValue: sqe.opcode) {
    case .compress:
      raw = accel_engine_compress(
        ctx, sqe.algorithm, sqe.level, src, inputLength, dst, sqe.dst_capacity, &produced, &consumed)
    case .decompress:
      raw = accel_engine_decompress(ctx, sqe.algorithm, src, inputLength, dst, sqe.dst_capacity, &produced, &consumed)
    case .encrypt, .decrypt:
      let (key, keyLength) = keyMaterial(sqe, region: region)
      // The parameter block is copied out of shared memory before it is checked,
      // as the SQE is: the engine reads only this copy, so a peer that rewrites
      // `aad_length` after the check cannot make it read past the block.
      var params = region.bytes(at: sqe.aux_offset).loadUnaligned(as: accel_aead_params.self)
      let aadLength = UInt64(params.aad_length)
      guard UInt64(CryptoSizing.aeadParamsLength) + aadLength <= UInt64(sqe.aux_length) else {
        return (.badParams, 0, 0)
      }
      let aad = UnsafePointer(
        region.bytes(at: sqe.aux_offset + UInt64(CryptoSizing.aeadParamsLength)).assumingMemoryBound(to: UInt8.self))
      let encrypt: Int32 = sqe.opcode == DeviceOpcode.encrypt.rawValue ? 1 : 0
      raw = withUnsafePointer(to: &params) { p in
        accel_engine_aead(ctx, encrypt, sqe.algorithm, key, keyLength, p, aad, src, inputLength, dst, sqe.dst_capacity, &produced)
      }
      consumed = inputLength
    case .digest:
      let (key, keyLength) = keyMaterial(sqe, region: region)
      raw = accel_engine_digest(ctx, sqe.algorithm, key, keyLength, src, inputLength, dst, sqe.dst_capacity, &produced)
      consumed = inputLength
    case .nop, nil:
      raw = 0
    }
    var status = DeviceStatus(rawValue: raw) ?? .engineError
    // The engine reports how much it wrote; never more than the buffer.
    if produced > sqe.dst_capacity {
      status = .engineError
      produced = 0
    }
    return (status, status == .ok ? produced : 0, consumed)
  }

  /// The key in the SQE's slot, or (nil, 0) when it names none. Validation already
  /// checked that a keyed operation names an existing slot.
  private func keyMaterial(_ sqe: accel_sqe, region: QueueRegion) -> (UnsafePointer<UInt8>?, UInt32) {
    guard let offset = region.layout.keySlot(sqe.key_slot) else { return (nil, 0) }
    let slot = region.bytes(at: offset).assumingMemoryBound(to: accel_key_slot.self)
    let length = min(slot.pointee.length, ACCEL_KEY_MAX)
    let key = UnsafePointer(region.bytes(at: offset + 8).assumingMemoryBound(to: UInt8.self))
    return (key, length)
  }
}

/// Counters one engine keeps about itself.
public final class EngineStats: Sendable {
  public let id: Int
  let jobs = Atomic<UInt64>(0)
  let busyNanoseconds = Atomic<UInt64>(0)
  let parks = Atomic<UInt64>(0)
  let verified = Atomic<UInt64>(0)
  init(id: Int) { self.id = id }

  /// Compression results this engine verified (compress-and-verify).
  public var verifiedCount: UInt64 { verified.load(ordering: .relaxed) }

  /// Jobs completed by this engine.
  public var jobCount: UInt64 { jobs.load(ordering: .relaxed) }
  /// Device time spent on jobs, including any throughput-cap pacing.
  public var busyTime: UInt64 { busyNanoseconds.load(ordering: .relaxed) }
  /// Times the engine parked on the doorbell.
  public var parkCount: UInt64 { parks.load(ordering: .relaxed) }
}

/// Errors, resets and isolation as the device counts them.
public struct DeviceErrorStatistics: Sendable, Equatable {
  /// Device-side queue errors, the ones that count toward isolation: device
  /// faults (injected ones included: errors, lost, malformed and stalled
  /// completions), engine errors and verify mismatches. Errors a peer can cause
  /// (resets, bad descriptors, index games) put only that peer's queue in error.
  public var queueErrors: UInt64
  /// Queue resets carried out.
  public var resets: UInt64
  /// Times the device isolated itself.
  public var isolations: UInt64
  /// Faults injected on purpose.
  public var injectedFaults: UInt64
  /// Whether the device is isolated now.
  public var isolated: Bool
}

private struct IsolationState {
  var errorTimes: [UInt64] = []
  var isolatedAt: UInt64?
}

private final class DeviceCounters: Sendable {
  let queueErrors = Atomic<UInt64>(0)
  let resets = Atomic<UInt64>(0)
  let isolations = Atomic<UInt64>(0)
  let injected = Atomic<UInt64>(0)
}

/// Device construction failures.
public enum DeviceError: Error, CustomStringConvertible {
  case invalidConfiguration(String)
  case region(String)
  case budget(String)

  public var description: String {
    switch self {
    case .invalidConfiguration(let why): "invalid device configuration: \(why)"
    case .region(let why): "cannot create queue region: \(why)"
    case .budget(let why): "out of device memory: \(why)"
    }
  }
}
