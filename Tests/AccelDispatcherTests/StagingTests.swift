import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelScheduler
import Foundation
import Synchronization
import Testing

/// Network lane at the dispatcher: payloads staged in a queue's pool before
/// their job exists, pooled results handed to the caller, and the pool's
/// accounting on every path (docs/NETWORK_LANE.md).
@Suite(.serialized, .timeLimit(.minutes(2))) struct StagingTests {
  /// Two queues with 4 MiB pools, one engine (optionally slow); staging zones of
  /// at most 2 MiB that leave 1 MiB for the largest job.
  final class Rig: @unchecked Sendable {
    let device: EmulatedDevice
    let driver: DeviceDriver
    let dispatcher: Dispatcher

    init(
      capMBps: Double? = nil, zone: UInt64 = 2 << 20, largestJob: UInt64 = 1 << 20, queues: Int = 2,
      tenants: [TenantPolicy] = [], deadline: Duration = .seconds(30), maxQueued: Int = 64, inFlightPerQueue: Int = 8
    ) throws {
      let device = try EmulatedDevice(
        configuration: .defaults {
          $0.queueCount = queues
          $0.engineCount = 1
          $0.dataPoolBytes = 4 << 20
          $0.engineThroughputCapMBps = capMBps
          $0.idleSpin = .microseconds(10)
          $0.parkTimeout = .milliseconds(20)
          $0.isolationThreshold = 1000
        })
      device.start()
      self.device = device
      var dc = DriverConfiguration.defaults
      dc.maintenanceInterval = .milliseconds(10)
      dc.completionTimeout = .seconds(2)
      driver = try DeviceDriver(queueFileDescriptors: (0..<queues).map { device.exportQueue($0) }, configuration: dc)
      var c = DispatcherConfiguration.defaults
      c.sweepInterval = .milliseconds(5)
      c.stagingZoneBytes = zone
      c.largestJobBytes = largestJob
      c.defaultDeadline = deadline
      c.maxQueuedJobs = maxQueued
      c.inFlightPerQueue = inFlightPerQueue
      dispatcher = Dispatcher(driver: driver, configuration: c, tenants: tenants)
      dispatcher.start()
    }

    func stop() {
      dispatcher.shutdown()
      driver.stop()
      device.stop()
    }

    /// Compressible bytes, built by whole chunks (cheap even in a debug build, so
    /// the tests leave the cooperative pool to the timing-sensitive suites).
    static func text(_ n: Int, seed: UInt8 = 1) -> Data {
      let words = Array("accelerator queue engine descriptor doorbell completion pool tenant ".utf8)
      let chunk = Data((0..<4096).map { words[($0 &* 7 &+ Int(seed)) % words.count] })
      var out = Data(capacity: n)
      var i = 0
      while out.count < n {
        out.append(chunk.prefix(n - out.count))
        out.append(UInt8(truncatingIfNeeded: i))  // no two chunks alike
        i += 1
      }
      return out.prefix(n)
    }

    /// Stages `data` for `tenant` and fills the buffer (what the deserializer does).
    func stage(_ data: Data, tenant: String = "default", sensitive: Bool = false) throws -> StagedInput {
      let staged = try dispatcher.stageInput(length: data.count, tenant: tenant, sensitive: sensitive).get()
      data.withUnsafeBytes { staged.buffer.copyMemory(from: $0) }
      return staged
    }

    func compressJob(_ staged: StagedInput, tenant: String = "default", deadline: ContinuousClock.Instant? = nil)
      -> JobRequest
    {
      var job = JobRequest(
        opcode: .compress, algorithm: .gzip, level: 1, input: Data(),
        outputCapacity: Int(BufferSizing.compressBound(UInt64(staged.length))), tenant: tenant, deadline: deadline)
      job.input = .staged(staged, skip: 0)
      job.output = .pooled
      return job
    }

    func decompress(_ data: Data, capacity: Int) async throws -> Data {
      try await dispatcher.execute(
        JobRequest(opcode: .decompress, algorithm: .gzip, input: data, outputCapacity: capacity)
      ).output
    }

    /// Every pool whole again, nothing staged, nothing leased.
    func isIdle() -> Bool {
      driver.queues.allSatisfy { $0.poolFreeBytes == $0.poolCapacity && $0.stagedBytes == 0 && $0.leasedCount == 0 }
        && dispatcher.stagedBytesByTenant.isEmpty
    }

    /// Waits until `tenant` has `n` jobs waiting in the scheduler.
    func waitQueued(_ tenant: String, _ n: Int) async throws {
      for _ in 0..<1000 where dispatcher.tenantState(tenant).queuedJobs != n { try await Task.sleep(for: .milliseconds(2)) }
      #expect(dispatcher.tenantState(tenant).queuedJobs == n)
    }

    func waitIdle(_ limit: Duration = .seconds(10)) async -> Bool {
      let end = ContinuousClock.now + limit
      while ContinuousClock.now < end {
        if isIdle() { return true }
        try? await Task.sleep(for: .milliseconds(5))
      }
      return isIdle()
    }
  }

  @Test func stagedJobSkipsTheDispatcherCopiesAndGivesThePoolBack() async throws {
    let rig = try Rig()
    defer { rig.stop() }
    let data = Rig.text(300_000)
    let staged = try rig.stage(data)
    #expect(staged.isStaged)
    #expect(staged.queue.stagedBytes == staged.queue.poolFootprint(UInt64(data.count)))
    let result = try await rig.dispatcher.execute(rig.compressJob(staged))
    #expect(!staged.isStaged, "the lease took the buffer")
    #expect(result.stats.inputCopies == 0 && result.stats.outputCopies == 0)
    #expect(result.output.isEmpty)
    let pooled = try #require(result.pooledOutput)
    #expect(pooled.count == Int(result.stats.outputBytes))
    #expect(result.stats.queueID == staged.queue.queueID, "a staged job runs on its payload's queue")
    let compressed = pooled.withBytes { Data($0) }
    #expect(!rig.isIdle(), "the lease is held until the pooled output is released")
    #expect(staged.queue.leasedCount == 1)
    #expect(rig.dispatcher.stagedBytes(tenant: "default") > 0, "running, the payload still counts against its tenant")
    pooled.release()
    pooled.release()  // idempotent
    #expect(try await rig.decompress(compressed, capacity: data.count) == data)
    #expect(await rig.waitIdle())
  }

  @Test func pooledOutputReleasesOnceUnderConcurrentReleases() async throws {
    let rig = try Rig()
    defer { rig.stop() }
    for _ in 0..<20 {
      let result = try await rig.dispatcher.execute(rig.compressJob(try rig.stage(Rig.text(20_000))))
      let pooled = try #require(result.pooledOutput)
      DispatchQueue.concurrentPerform(iterations: 8) { _ in pooled.release() }
      #expect(pooled.isReleased)
    }
    // A pooled output nobody releases goes back with its last reference.
    do {
      let result = try await rig.dispatcher.execute(rig.compressJob(try rig.stage(Rig.text(20_000))))
      #expect(result.pooledOutput != nil)
    }
    #expect(await rig.waitIdle())
  }

  @Test func stagedBuffersStayInTheZoneAtTheTopOfThePool() throws {
    let rig = try Rig(zone: 2 << 20, largestJob: 3 << 20, queues: 1)
    defer { rig.stop() }
    let q = rig.driver.queues[0]
    let zone = q.stagingZoneBytes
    #expect(zone == 1 << 20, "the zone leaves the largest job its room: min(2 MiB, 4 MiB - 3 MiB)")
    let end = q.region.layout.dataOffset + q.poolCapacity
    var held: [StagedInput] = []
    while case .success(let s) = rig.dispatcher.stageInput(length: 100_000, tenant: "t", sensitive: false) { held.append(s) }
    #expect(held.count == Int(zone / q.poolFootprint(100_000)))
    for s in held { #expect(s.offset >= end - zone && s.offset + UInt64(s.length) <= end) }
    if case .failure(let why) = rig.dispatcher.stageInput(length: 100_000, tenant: "t", sensitive: false) {
      #expect(why == .poolFull, "alone, the tenant's share is the whole zone")
    }
    if case .failure(let why) = rig.dispatcher.stageInput(length: Int(zone) + 1, tenant: "u", sensitive: false) {
      #expect(why == .poolFull, "larger than any zone")
    }
    // The rest of the pool still takes the largest job whole.
    let lease = q.reserve(srcLength: 3 << 20, dstCapacity: 0, handler: { _ in })
    #expect(lease != nil)
    if let lease { q.release(lease) }
    held.removeAll()
    #expect(q.poolFreeBytes == q.poolCapacity)
    #expect(rig.isIdle())
  }

  @Test func stagingOffRefusesWithoutTouchingThePool() throws {
    let rig = try Rig(zone: 0)
    defer { rig.stop() }
    if case .failure(let why) = rig.dispatcher.stageInput(length: 10, tenant: "t", sensitive: false) { #expect(why == .off) } else {
      Issue.record("staged with staging off")
    }
    let tight = try Rig(zone: 2 << 20, largestJob: 4 << 20)
    defer { tight.stop() }
    #expect(tight.driver.queues.allSatisfy { $0.stagingZoneBytes == 0 }, "a pool that only holds the largest job has no zone")
    if case .failure(let why) = tight.dispatcher.stageInput(length: 10, tenant: "t", sensitive: false) { #expect(why == .off) }
  }

  @Test func aTenantHoldsAtMostItsShareAndNewcomersGetTheirs() throws {
    // Two zones of 1 MiB: 2 MiB in all.
    let rig = try Rig(zone: 1 << 20, largestJob: 3 << 20)
    defer { rig.stop() }
    let chunk = 256 << 10
    var flood: [StagedInput] = []
    // Alone, the flooder may fill both zones.
    while case .success(let s) = rig.dispatcher.stageInput(length: chunk, tenant: "flood", sensitive: false) { flood.append(s) }
    #expect(flood.count == 8)
    // A newcomer's share is half, but the zones are full: it copies for now.
    if case .failure(let why) = rig.dispatcher.stageInput(length: chunk, tenant: "light", sensitive: false) {
      #expect(why == .poolFull)
    }
    // Two of the flooder's payloads go (their jobs ended): the flooder, over its
    // half now that two tenants compete, may not take the space back...
    flood.removeLast(2)
    var share = rig.dispatcher.stageInput(length: chunk, tenant: "flood", sensitive: false)
    if case .failure(let why) = share { #expect(why == .tenantShare) } else { Issue.record("flooder over its share staged") }
    // ...the newcomer gets it.
    let light = try rig.dispatcher.stageInput(length: chunk, tenant: "light", sensitive: false).get()
    #expect(rig.dispatcher.stagedBytes(tenant: "light") == UInt64(chunk))
    // Down to its half, the flooder stages again.
    flood.removeLast(3)
    share = rig.dispatcher.stageInput(length: chunk, tenant: "flood", sensitive: false)
    #expect((try? share.get()) != nil)
    light.release()
    flood.removeAll()
    share = .failure(.off)
    #expect(rig.isIdle())
  }

  @Test func stagedBuffersAreFreedOnEveryFailurePath() async throws {
    // A slow device: one 1 MB job takes ~1 s, so jobs behind it wait.
    let rig = try Rig(
      capMBps: 1, queues: 1, tenants: [TenantPolicy(id: "t", limits: TenantLimits(maxQueuedJobs: 2))], inFlightPerQueue: 1)
    defer { rig.stop() }
    let blocker = Task { try await rig.dispatcher.execute(JobRequest(
      opcode: .compress, algorithm: .gzip, level: 1, input: Rig.text(1_000_000), outputCapacity: 1_100_000)) }
    for _ in 0..<1000 where rig.dispatcher.snapshot.inFlight != [1] { try await Task.sleep(for: .milliseconds(2)) }
    #expect(rig.dispatcher.snapshot.inFlight == [1], "the blocker holds the only in-flight place")

    // Deadline: expires while waiting.
    var job = rig.compressJob(try rig.stage(Rig.text(50_000), tenant: "t"), tenant: "t", deadline: .now + .milliseconds(30))
    await #expect(throws: JobError.deadlineExceeded) { _ = try await rig.dispatcher.execute(job) }

    // Cancelled while waiting.
    job = rig.compressJob(try rig.stage(Rig.text(50_000), tenant: "t"), tenant: "t")
    let id = rig.dispatcher.makeJobID()
    let waiting = Task { [job] in try await rig.dispatcher.execute(job, id: id) }
    try await rig.waitQueued("t", 1)
    rig.dispatcher.cancel(id: id)
    await #expect(throws: JobError.cancelled) { _ = try await waiting.value }
    #expect(job.stagedInput?.isStaged == false)

    // Rejected by admission: the tenant may queue two.
    let queued = (0..<2).map { _ in
      let j = rig.compressJob(try! rig.stage(Rig.text(50_000), tenant: "t"), tenant: "t")
      return Task { try await rig.dispatcher.execute(j) }
    }
    try await rig.waitQueued("t", 2)
    job = rig.compressJob(try rig.stage(Rig.text(50_000), tenant: "t"), tenant: "t")
    do {
      _ = try await rig.dispatcher.execute(job)
      Issue.record("admitted over the tenant's bound")
    } catch let e { #expect(e.kind == "rejected_tenant_queue_full") }
    #expect(job.stagedInput?.isStaged == false, "a refused job's payload is freed at once")

    // Abandoned on the device: the caller goes; the buffers return with the completion.
    for t in queued { t.cancel() }
    for t in queued { _ = try? await t.value }
    _ = try? await blocker.value
    job = rig.compressJob(try rig.stage(Rig.text(200_000), tenant: "t"), tenant: "t", deadline: .now + .milliseconds(20))
    await #expect(throws: JobError.deadlineExceeded) { _ = try await rig.dispatcher.execute(job) }
    #expect(await rig.waitIdle(), "every staged byte and lease is back")
  }

  @Test func aStagedJobWhoseQueueFailsIsRetriedFromACopy() async throws {
    let rig = try Rig()
    defer { rig.stop() }
    let data = Rig.text(100_000)
    let staged = try rig.stage(data)
    // Every job on the staged queue fails with a queue-class error; the retry
    // must run elsewhere, from a copy (the failed lease took the buffer with it).
    rig.device.injectFaults(FaultInjection(mode: .error, queue: staged.queue.queueID))
    let result = try await rig.dispatcher.execute(rig.compressJob(staged))
    rig.device.injectFaults(.none)
    #expect(result.stats.queueID != staged.queue.queueID)
    #expect(result.stats.inputCopies == 2, "out of the failed lease, into the retry's")
    let out = try #require(result.pooledOutput).withBytes { Data($0) }
    result.pooledOutput?.release()
    #expect(try await rig.decompress(out, capacity: data.count) == data)
    #expect(await rig.waitIdle())
  }

  @Test func aStagedJobOnAReplacedDriverRunsOnTheNewOneFromACopy() async throws {
    let rig = try Rig()
    defer { rig.stop() }
    let data = Rig.text(100_000)
    let staged = try rig.stage(data)
    // Fail over to a fresh driver (here: over the same device, the old one stopped).
    let fresh = try DeviceDriver(queueFileDescriptors: [rig.device.exportQueue(0), rig.device.exportQueue(1)])
    rig.dispatcher.failover(to: fresh, oldIsGone: true, reason: "test", degraded: nil)
    defer { fresh.stop() }
    #expect(fresh.queues.allSatisfy { $0.stagingZoneBytes == 2 << 20 }, "the new driver's pools get zones too")
    let result = try await rig.dispatcher.execute(rig.compressJob(staged))
    #expect(result.stats.inputCopies == 1, "from the old mapping into the new pool")
    #expect(!staged.isStaged)
    let out = try #require(result.pooledOutput).withBytes { Data($0) }
    result.pooledOutput?.release()
    #expect(try await rig.decompress(out, capacity: data.count) == data)
    #expect(staged.queue.poolFreeBytes == staged.queue.poolCapacity, "the old pool's staged buffer was freed")
    #expect(fresh.queues.allSatisfy { $0.poolFreeBytes == $0.poolCapacity && $0.leasedCount == 0 })
    #expect(rig.dispatcher.stagedBytesByTenant.isEmpty)
  }

  @Test func aStagedJobWhoseQueueIsBusyRunsOnAFreeOneFromOnePoolToPoolCopy() async throws {
    let rig = try Rig(capMBps: 5)
    defer { rig.stop() }
    let a = try rig.stage(Rig.text(1_000_000))
    let b = try rig.stage(Rig.text(10_000))
    #expect(a.queue !== b.queue, "the emptier zone first")
    // A 1 MB job fills its queue's device-time budget for ~0.2 s.
    let blocker = Task { try await rig.dispatcher.execute(rig.compressJob(a)) }
    for _ in 0..<1000 where a.isStaged { try await Task.sleep(for: .milliseconds(1)) }
    let data = Rig.text(50_000, seed: 3)
    let c = try rig.stage(data)
    #expect(c.queue === a.queue, "no payload waits there any more")
    let result = try await rig.dispatcher.execute(rig.compressJob(c))
    #expect(result.stats.queueID == b.queue.queueID, "it did not wait for its busy queue")
    #expect(result.stats.inputCopies == 1, "one copy, pool to pool")
    #expect(!c.isStaged && c.queue.stagedBytes == 0)
    let out = try #require(result.pooledOutput).withBytes { Data($0) }
    result.pooledOutput?.release()
    #expect(try await rig.decompress(out, capacity: data.count) == data)
    try await blocker.value.pooledOutput?.release()
    b.release()
    #expect(await rig.waitIdle())
  }

  @Test func manyStagedJobsAtOnceAllCompleteAndLeaveNothingBehind() async throws {
    let rig = try Rig()
    defer { rig.stop() }
    let outcomes = await withTaskGroup(of: (Bool, UInt32).self) { group in
      for i in 0..<40 {
        group.addTask {
          let data = Rig.text(60_000 + i * 1000, seed: UInt8(i))
          var job: JobRequest
          var staged = false
          if case .success(let s) = rig.dispatcher.stageInput(length: data.count, tenant: "t\(i % 3)", sensitive: i % 2 == 0) {
            data.withUnsafeBytes { s.buffer.copyMemory(from: $0) }
            job = rig.compressJob(s, tenant: "t\(i % 3)")
            staged = true
          } else {
            job = JobRequest(
              opcode: .compress, algorithm: .gzip, level: 1, input: data,
              outputCapacity: Int(BufferSizing.compressBound(UInt64(data.count))), tenant: "t\(i % 3)")
          }
          guard let r = try? await rig.dispatcher.execute(job) else { return (false, 0) }
          let out = r.pooledOutput.map { p in p.withBytes { Data($0) } } ?? r.output
          let back = try? await rig.decompress(out, capacity: data.count)
          return (back == data, staged ? r.stats.inputCopies : 1)
        }
      }
      return await group.reduce(into: []) { $0.append($1) }
    }
    #expect(outcomes.allSatisfy { $0.0 })
    #expect(outcomes.contains { $0.1 == 0 }, "some jobs ran from their staged payload")
    #expect(await rig.waitIdle())
  }
}
