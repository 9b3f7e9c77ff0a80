import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelScheduler
import Foundation
import Testing

/// Each fault the device can inject, and what a caller sees: retried once on a
/// healthy queue, UNAVAILABLE when the retry fails too, and service resuming
/// after the queue is reset. One engine, two queues, short timeouts.
@Suite(.timeLimit(.minutes(2))) struct FaultRecoveryTests {
  final class Rig: @unchecked Sendable {
    let device: EmulatedDevice
    let driver: DeviceDriver
    let dispatcher: Dispatcher

    init(
      faults: FaultInjection = .none, verify: Bool = false, isolationThreshold: Int = 1000,
      completionTimeout: Duration = .seconds(1)
    ) throws {
      device = try EmulatedDevice(
        configuration: .defaults {
          $0.queueCount = 2
          $0.engineCount = 1
          $0.dataPoolBytes = 4 << 20
          $0.idleSpin = .microseconds(10)
          $0.parkTimeout = .milliseconds(20)
          $0.faults = faults
          $0.isolationThreshold = isolationThreshold
          $0.isolationCooldown = nil
        })
      device.start()
      var dc = DriverConfiguration.defaults
      dc.completionTimeout = completionTimeout
      dc.maintenanceInterval = .milliseconds(10)
      driver = try DeviceDriver(queueFileDescriptors: [device.exportQueue(0), device.exportQueue(1)], configuration: dc)
      var c = DispatcherConfiguration.defaults
      c.sweepInterval = .milliseconds(5)
      c.verifyCompression = verify
      dispatcher = Dispatcher(driver: driver, configuration: c)
      dispatcher.start()
    }

    func stop() {
      dispatcher.shutdown()
      driver.stop()
      device.stop()
    }

    static let input = Data((0..<50_000).map { UInt8(truncatingIfNeeded: $0 % 251 &* 7) })

    func compress() async -> Result<JobResult, JobError> {
      let r = JobRequest(
        opcode: .compress, algorithm: .gzip, level: 1, input: Self.input,
        outputCapacity: Int(BufferSizing.compressBound(UInt64(Self.input.count))))
      do { return .success(try await dispatcher.execute(r)) } catch { return .failure(error) }
    }

    func decompress(_ data: Data) async -> Result<JobResult, JobError> {
      let r = JobRequest(opcode: .decompress, algorithm: .gzip, input: data, outputCapacity: Self.input.count + 1)
      do { return .success(try await dispatcher.execute(r)) } catch { return .failure(error) }
    }

    /// Waits (generously) until every queue is back in service.
    func waitUntilHealthy(_ limit: Duration = .seconds(10)) async -> Bool {
      let end = ContinuousClock.now + limit
      while ContinuousClock.now < end {
        if driver.queues.allSatisfy(\.isHealthy) { return true }
        try? await Task.sleep(for: .milliseconds(10))
      }
      return false
    }
  }

  static func unavailableReason(_ r: Result<JobResult, JobError>) -> String? {
    if case .failure(.unavailable(let why)) = r { return why }
    return nil
  }

  @Test func anErrorCompletionIsRetriedOnceOnAHealthyQueue() async throws {
    // Every second job the device runs fails with DEVICE_FAULT; its retry is the next job, which succeeds.
    let rig = try Rig(faults: FaultInjection(mode: .error, every: 2))
    defer { rig.stop() }
    for _ in 0..<6 {
      _ = try (await rig.compress()).get()
    }
    #expect(rig.dispatcher.snapshot.retried >= 2)
    #expect(rig.device.errorStatistics.queueErrors >= 2)
    #expect(await rig.waitUntilHealthy(), "the failed queue is reset and back in service")
    #expect(rig.device.errorStatistics.resets >= 1)
  }

  @Test func aFailedRetryIsUnavailableAndServiceResumesWhenTheFaultClears() async throws {
    let rig = try Rig(faults: FaultInjection(mode: .error))
    defer { rig.stop() }
    let r = await rig.compress()
    let why = try #require(Self.unavailableReason(r), "got \(r)")
    #expect(why.contains("device fault"), "\(why)")
    #expect(rig.dispatcher.snapshot.retried == 1)
    rig.device.injectFaults(.none)
    #expect(await rig.waitUntilHealthy())
    _ = try (await rig.compress()).get()
  }

  @Test func aLostCompletionIsDetectedAndTheJobRetried() async throws {
    let rig = try Rig(faults: FaultInjection(mode: .lost, every: 2), completionTimeout: .seconds(1))
    defer { rig.stop() }
    let start = ContinuousClock.now
    for _ in 0..<3 { _ = try (await rig.compress()).get() }
    // One completion was lost: noticed after the 1 s timeout, well inside 15 s.
    #expect(ContinuousClock.now - start < .seconds(15))
    #expect(rig.driver.queues.map(\.statistics.stalls).reduce(0, +) >= 1)
    #expect(rig.dispatcher.snapshot.retried >= 1)
    #expect(await rig.waitUntilHealthy())
  }

  @Test func corruptCompletionsFailOnlyTheirJobsAndNeverLeakBytes() async throws {
    let rig = try Rig(faults: FaultInjection(mode: .corruptCompletion))
    defer { rig.stop() }
    let r = await rig.compress()
    let why = try #require(Self.unavailableReason(r), "got \(r)")
    #expect(why.contains("malformed completion"), "\(why)")
    #expect(rig.driver.queues.map(\.statistics.invalidCompletions).reduce(0, +) >= 2)
    rig.device.injectFaults(.none)
    #expect(await rig.waitUntilHealthy())
    let ok = try (await rig.compress()).get()
    let back = try (await rig.decompress(ok.output)).get()
    #expect(back.output == Rig.input)
  }

  @Test func compressAndVerifyCatchesCorruptOutputThatSizeChecksMiss() async throws {
    // Without verify, a flipped byte reaches the caller unnoticed...
    let plain = try Rig(faults: FaultInjection(mode: .corruptOutput))
    let corrupted = try (await plain.compress()).get()
    plain.device.injectFaults(.none)
    let clean = try (await plain.compress()).get()
    #expect(corrupted.output.count == clean.output.count)
    #expect(corrupted.output != clean.output)
    plain.stop()

    // ...with verify, the device refuses to complete it, and a clean job verifies.
    let rig = try Rig(faults: FaultInjection(mode: .corruptOutput), verify: true)
    defer { rig.stop() }
    let r = await rig.compress()
    let why = try #require(Self.unavailableReason(r), "got \(r)")
    #expect(why.contains("verify"), "\(why)")
    rig.device.injectFaults(.none)
    #expect(await rig.waitUntilHealthy())
    let ok = try (await rig.compress()).get()
    #expect(ok.output == clean.output)
    #expect(rig.device.engines.map(\.verifiedCount).reduce(0, +) >= 3)
  }

  @Test func aStalledEngineFailsItsJobsInTimeAndResumesWhenItRecovers() async throws {
    let rig = try Rig(faults: FaultInjection(mode: .stall), completionTimeout: .seconds(1))
    defer { rig.stop() }
    let start = ContinuousClock.now
    let r = await rig.compress()
    let why = try #require(Self.unavailableReason(r), "got \(r)")
    #expect(why.contains("no completion"), "\(why)")
    // Two timeouts (first try and retry): seconds, not a hang.
    #expect(ContinuousClock.now - start < .seconds(15))
    rig.device.injectFaults(.none)
    #expect(await rig.waitUntilHealthy())
    _ = try (await rig.compress()).get()
  }

  @Test func repeatedQueueErrorsIsolateTheDeviceUntilLifted() async throws {
    let rig = try Rig(faults: FaultInjection(mode: .error), isolationThreshold: 3)
    defer { rig.stop() }
    for _ in 0..<2 { _ = await rig.compress() }  // 4 device faults: two jobs, each retried once
    #expect(rig.device.isIsolated)
    #expect(rig.device.errorStatistics.isolations == 1)
    // An isolated device runs nothing: new jobs fail without a retry.
    let before = rig.dispatcher.snapshot.retried
    let r = await rig.compress()
    #expect(Self.unavailableReason(r) != nil, "got \(r)")
    #expect(rig.dispatcher.snapshot.retried == before)
    let anyHealthy = rig.driver.queues.contains { $0.isHealthy }
    #expect(!anyHealthy)
    rig.device.injectFaults(.none)
    rig.device.liftIsolation()
    #expect(await rig.waitUntilHealthy())
    _ = try (await rig.compress()).get()
  }

  @Test func addedLatencyMeetsTheCallersDeadline() async throws {
    // The device is slow (1.5 s), but well inside the completion timeout (10 s), so
    // only the caller's deadline (200 ms) can end the call, however late the sweeper runs.
    let rig = try Rig(faults: FaultInjection(mode: .latency, latency: .milliseconds(1500)), completionTimeout: .seconds(10))
    defer { rig.stop() }
    let r = JobRequest(
      opcode: .compress, algorithm: .gzip, level: 1, input: Rig.input,
      outputCapacity: Int(BufferSizing.compressBound(UInt64(Rig.input.count))),
      deadline: .now + .milliseconds(200))
    await #expect(throws: JobError.deadlineExceeded) { try await rig.dispatcher.execute(r) }
    // A slow device is not a broken one: the queue stays in service.
    let allHealthy = rig.driver.queues.allSatisfy { $0.isHealthy }
    #expect(allHealthy)
  }

  @Test func faultPlansParseAndRefuseNonsense() throws {
    let f = try FaultInjection(parsing: "lost,every=3,queue=1")
    #expect(f.mode == .lost && f.every == 3 && f.queue == 1)
    #expect(try FaultInjection(parsing: "latency,latency-ms=250").latency == .milliseconds(250))
    #expect(f.description == "lost,every=3,queue=1")
    #expect(throws: DeviceError.self) { try FaultInjection(parsing: "explode") }
    #expect(throws: DeviceError.self) { try FaultInjection(parsing: "error,every=0") }
  }
}
