internal import AccelABI
internal import Foundation
internal import Synchronization

/// Tuning for the driver's completion reaper.
package struct DriverConfiguration: Sendable {
  /// How long the reaper polls an empty completion ring before parking.
  package var reaperSpin: Duration = .microseconds(20)
  /// Longest the parked reaper sleeps before re-checking.
  package var reaperParkTimeout: Duration = .milliseconds(50)
  /// A job with no completion for this long is declared lost: the queue's
  /// in-flight jobs fail as a queue error and the queue is reset. Must exceed
  /// the longest job the device can be given.
  package var completionTimeout: Duration = .seconds(5)
  /// How often the reaper runs error recovery (health, stalls, resets).
  package var maintenanceInterval: Duration = .milliseconds(50)
  package init() {}
  package static var defaults: Self { Self() }
}

/// The user-space driver: the queues attached from a device, and one reaper
/// thread that validates completions and hands them to their waiters.
///
/// The reaper is a dedicated OS thread, never a cooperative-pool task: it
/// spins briefly on the completion rings, then parks on their doorbell futexes.
package final class DeviceDriver: @unchecked Sendable {
  package let queues: [DriverQueue]
  package let configuration: DriverConfiguration
  private let running = Atomic<Bool>(false)
  private let exited = DispatchSemaphore(value: 0)
  private let afterReap: Mutex<CallbackBox<Void>?> = Mutex(nil)
  private let regionHostBox = Mutex<(any ExternalRegionHost)?>(nil)

  /// The device behind these queues, for attaching client memory (nil: not supported).
  package var regionHost: (any ExternalRegionHost)? {
    get { regionHostBox.withLock { $0 } }
    set { regionHostBox.withLock { $0 = newValue } }
  }

  /// Attaches to queue regions given as memfd descriptors (ownership passes to the driver).
  package init(queueFileDescriptors fds: [Int32], configuration: DriverConfiguration = .defaults) throws(DriverError) {
    var queues: [DriverQueue] = []
    for (i, fd) in fds.enumerated() {
      do {
        queues.append(DriverQueue(index: i, region: try QueueRegion.attach(fd: fd)))
      } catch {
        throw .attach(queue: i, reason: error.description)
      }
    }
    guard !queues.isEmpty else { throw .attach(queue: 0, reason: "device offered no queues") }
    self.queues = queues
    self.configuration = configuration
  }

  deinit { stop() }

  /// Called on the reaper thread after each round that delivered completions.
  package func setAfterReap(_ hook: @escaping @Sendable () -> Void) { afterReap.withLock { $0 = CallbackBox { _ in hook() } } }

  package func start() {
    guard running.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged else {
      return
    }
    let t = Thread { [self] in
      Thread.current.name = "accel-reaper"
      self.reaperLoop()
      self.exited.signal()
    }
    t.start()
  }

  /// Fails every in-flight job on every queue (the device is gone).
  package func failAll(reason: String = "device gone") { for q in queues { q.fault(reason: reason) } }

  package func stop() {
    guard running.compareExchange(expected: true, desired: false, ordering: .sequentiallyConsistent).exchanged else {
      return
    }
    for q in queues {
      q.cqDoorbell.fetchAdd(1)
      q.cqDoorbell.wake()
    }
    exited.wait()
  }

  private func reaperLoop() {
    let spinNs = configuration.reaperSpin.nanoseconds
    let maintenanceNs = configuration.maintenanceInterval.nanoseconds
    let timeoutNs = configuration.completionTimeout.nanoseconds
    var idle = IdleSpin(spinNanoseconds: spinNs)
    var lastMaintenance = idle.lastWork
    /// Completions that timed out, on the rounds that read the clock; true when any queue changed.
    func maintain(_ now: UInt64) -> Bool {
      guard now &- lastMaintenance >= maintenanceNs else { return false }
      lastMaintenance = now
      var changed = false
      for q in queues {
        let (failed, queueChanged) = q.maintain(now: now, completionTimeout: timeoutNs)
        for (handler, completion) in failed { handler(completion) }
        changed = changed || queueChanged
      }
      return changed
    }
    while running.load(ordering: .relaxed) {
      var n = 0
      for q in queues { n += q.reap() }
      if n > 0 {
        let now = SharedMemory.nowNanoseconds()
        _ = maintain(now)
        afterReap.withLock { $0 }?.call(())
        idle.worked(now: now)
        continue
      }
      var changed = false
      let spinning = idle.keepSpinning(clock: { changed = maintain($0) || changed })
      if changed {
        afterReap.withLock { $0 }?.call(())
        idle.worked()
        continue
      }
      if spinning { continue }
      // Park: same Dekker protocol as the device's engines, mirrored on the CQ.
      for q in queues { q.cqNeedWakeup.storeSeqCst(1) }
      SharedMemory.fence()
      let seen = queues.map { $0.cqDoorbell.loadAcquire() }
      if !queues.contains(where: { $0.hasCompletions }) && running.load(ordering: .relaxed) {
        SharedMemory.waitAny(
          queues.map { $0.cqDoorbell.pointer }, expected: seen,
          timeoutNanoseconds: configuration.reaperParkTimeout.nanoseconds)
      }
      for q in queues { q.cqNeedWakeup.storeSeqCst(0) }
      idle.worked()
      if maintain(idle.lastWork) { afterReap.withLock { $0 }?.call(()) }
    }
  }
}

/// Driver failures.
package enum DriverError: Error, CustomStringConvertible {
  case attach(queue: Int, reason: String)
  package var description: String {
    switch self {
    case .attach(let q, let why): "cannot attach queue \(q): \(why)"
    }
  }
}

extension Duration {
  var nanoseconds: UInt64 {
    let (s, a) = components
    return UInt64(max(0, s)) * 1_000_000_000 + UInt64(max(0, a / 1_000_000_000))
  }
}
