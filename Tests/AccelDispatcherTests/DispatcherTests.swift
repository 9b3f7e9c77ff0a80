import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelScheduler
import Foundation
import Synchronization
import Testing

/// Admission, deadlines and cancellation against a real (slow) device.
@Suite(.timeLimit(.minutes(2))) struct DispatcherTests {
  /// A device slow enough that jobs visibly wait: 1 engine at `capMBps`.
  final class Rig: @unchecked Sendable {
    let device: EmulatedDevice
    let driver: DeviceDriver
    let dispatcher: Dispatcher

    init(
      capMBps: Double? = 1, pool: UInt64 = 4 << 20, maxQueued: Int = 64, deadline: Duration = .seconds(30),
      inFlightPerQueue: Int = 1
    ) throws {
      device = try EmulatedDevice(
        configuration: .defaults {
          $0.queueCount = 1
          $0.engineCount = 1
          $0.dataPoolBytes = pool
          $0.engineThroughputCapMBps = capMBps
          $0.idleSpin = .microseconds(10)
        })
      device.start()
      driver = try DeviceDriver(queueFileDescriptors: [device.exportQueue(0)])
      var c = DispatcherConfiguration.defaults
      c.inFlightPerQueue = inFlightPerQueue
      c.maxQueuedJobs = maxQueued
      c.defaultDeadline = deadline
      c.sweepInterval = .milliseconds(5)
      dispatcher = Dispatcher(
        driver: driver, configuration: c,
        tenants: [TenantPolicy(id: "default", limits: TenantLimits(maxQueuedJobs: maxQueued, maxOpenStreams: 1024))])
      dispatcher.start()
    }

    func stop() {
      dispatcher.shutdown()
      driver.stop()
      device.stop()
    }

    func job(_ bytes: Int, deadline: ContinuousClock.Instant? = nil) -> JobRequest {
      JobRequest(
        opcode: .compress, algorithm: .gzip, level: 1, input: Data(count: bytes),
        outputCapacity: Int(BufferSizing.compressBound(UInt64(bytes))), deadline: deadline)
    }

    var submitted: UInt64 { driver.queues[0].statistics.submitted }

    /// Waits (up to 10 s, for busy machines) until `condition` holds.
    func wait(until condition: () -> Bool) async throws {
      let end = ContinuousClock.now + .seconds(10)
      while !condition() && ContinuousClock.now < end { try await Task.sleep(for: .milliseconds(2)) }
      #expect(condition(), "timed out waiting")
    }
  }

  /// Every stream context slot the queue hands out now (given back before returning).
  func freeStreamSlots(_ dispatcher: Dispatcher) -> Set<UInt32> {
    var opened: [StreamTarget] = []
    while let t = try? dispatcher.openStream() { opened.append(t) }
    for t in opened { dispatcher.closeStream(t) }
    return Set(opened.map(\.slot))
  }

  @Test func aClosedStreamKeepsItsContextUntilItsLastSliceLeavesTheDevice() async throws {
    let rig = try Rig(capMBps: 2)
    defer { rig.stop() }
    let target = try rig.dispatcher.openStream()
    var step = DeviceStep(.compress, .gzip, level: 1)
    step.streamSlot = target.slot
    step.streamStart = true
    let bytes = 1 << 20  // ~0.5 s on the device at 2 MB/s
    var job = JobRequest(
      steps: [step], input: Data(count: bytes), outputCapacity: Int(BufferSizing.compressBound(UInt64(bytes))),
      tenant: "default")
    job.stream = target
    job.streamSequence = 0
    let slice = Task { () throws(JobError) -> JobResult in try await rig.dispatcher.execute(job) }
    try await rig.wait { rig.submitted >= 1 }
    // The caller gives up while the slice is on the device, and the stream closes.
    slice.cancel()
    _ = await slice.result
    rig.dispatcher.closeStream(target)
    #expect(rig.dispatcher.streamSlotsClosing == 1)
    #expect(!freeStreamSlots(rig.dispatcher).contains(target.slot), "the context is still in use by the device")
    try await rig.wait { rig.dispatcher.streamSlotsClosing == 0 }
    #expect(freeStreamSlots(rig.dispatcher).contains(target.slot), "the context came back after the slice")
  }

  @Test func fullQueueRejectsWithARetryHint() async throws {
    let rig = try Rig(capMBps: 0.5, maxQueued: 2)
    defer { rig.stop() }
    // One job runs (~200 ms at 0.5 MB/s), two wait, the rest are refused at once.
    let outcomes = await withTaskGroup(of: Result<JobResult, JobError>.self) { group in
      for _ in 0..<8 {
        group.addTask {
          do throws(JobError) { return .success(try await rig.dispatcher.execute(rig.job(100_000))) } catch { return .failure(error) }
        }
      }
      var all: [Result<JobResult, JobError>] = []
      for await o in group { all.append(o) }
      return all
    }
    let rejected = outcomes.compactMap { r -> UInt64? in
      if case .failure(.rejected(.queueFull, let retry)) = r { return retry }
      return nil
    }
    #expect(rejected.count >= 4, "at most 1 in flight + 2 queued may be admitted at a time")
    #expect(rejected.allSatisfy { $0 > 0 })
    #expect(outcomes.contains { if case .success = $0 { true } else { false } })
  }

  @Test func deadlinePassingInTheQueueNeverReachesTheDevice() async throws {
    let rig = try Rig(capMBps: 0.25)
    defer { rig.stop() }
    async let blocker = rig.dispatcher.execute(rig.job(250_000))  // ~1 s on the engine
    try await rig.wait { rig.submitted == 1 }
    let before = rig.submitted
    do throws(JobError) {
      _ = try await rig.dispatcher.execute(rig.job(1000, deadline: .now + .milliseconds(100)))
      Issue.record("expected a deadline error")
    } catch {
      #expect(error == .deadlineExceeded)
    }
    #expect(rig.submitted == before, "the expired job was never submitted")
    _ = try await blocker
  }

  @Test func cancellingAWaitingCallLeavesTheQueueAtOnce() async throws {
    let rig = try Rig(capMBps: 0.1)
    defer { rig.stop() }
    async let blocker = rig.dispatcher.execute(rig.job(250_000))  // ~2.5 s on the engine
    try await rig.wait { rig.submitted == 1 }
    let waiting = Task { () async throws(JobError) -> JobResult in try await rig.dispatcher.execute(rig.job(1000)) }
    try await rig.wait { rig.dispatcher.snapshot.queued == 1 }
    let t0 = ContinuousClock.now
    waiting.cancel()
    let result = await waiting.result
    #expect(ContinuousClock.now - t0 < .milliseconds(1500), "returned before the blocker finished")
    #expect(throws: JobError.cancelled) { try result.get() }
    #expect(rig.dispatcher.snapshot.queued == 0)
    _ = try await blocker
    #expect(rig.submitted == 1)
  }

  @Test func aJobLargerThanThePoolIsRefusedClearly() async throws {
    let rig = try Rig(capMBps: nil, pool: 1 << 20)
    defer { rig.stop() }
    await #expect(throws: JobError.self) { _ = try await rig.dispatcher.execute(rig.job(2 << 20)) }
    do throws(JobError) {
      _ = try await rig.dispatcher.execute(rig.job(2 << 20))
    } catch {
      guard case .tooLarge(let needed, let limit) = error else {
        Issue.record("unexpected \(error)")
        return
      }
      #expect(needed > limit && limit == 1 << 20)
    }
    // And a job that fits still runs.
    let ok = try await rig.dispatcher.execute(rig.job(1000))
    #expect(ok.stats.inputBytes == 1000 && ok.output.count > 0)
  }

  @Test func manyConcurrentJobsAllCompleteWithBatching() async throws {
    let rig = try Rig(capMBps: nil, maxQueued: 1000)
    defer { rig.stop() }
    let n = 400
    let outputs = try await withThrowingTaskGroup(of: Int.self) { group in
      for i in 0..<n {
        group.addTask { try await rig.dispatcher.execute(rig.job(1000 + i)).output.count }
      }
      var c = 0
      for try await o in group where o > 0 { c += 1 }
      return c
    }
    #expect(outputs == n)
    #expect(rig.driver.queues[0].leasedCount == 0, "every lease released")
  }
}
