internal import AccelABI
internal import Synchronization

/// The shell around `WakeupLedger`: it keeps the ledger under a lock and writes
/// its decisions into the queues' `sq_need_wakeup` flags and doorbells.
///
/// Every flag change keeps the Dekker pair with the driver (it stores
/// `sq_tail`, fences, loads the flag; the device stores the flag, fences, loads
/// `sq_tail`), so no job waits for a park timeout: work published while the
/// flags were down is seen by an attentive engine, or by the engine that stops
/// being attentive (it raises the flags, then looks for work it must hand to a
/// parked engine, or finds it on its way to park).
final class EngineWakeups: Sendable {
  private let ledger: Mutex<WakeupLedger>
  let policy: WakeupLedger.Policy

  init(policy: WakeupLedger.Policy = WakeupLedger.Policy()) {
    self.policy = policy
    ledger = Mutex(WakeupLedger(policy: policy))
  }

  /// An engine begins to spin idle or to run a short job.
  func attend(_ queues: [DeviceQueue]) {
    ledger.withLock { l in apply(l.attend(), to: queues) }
  }

  /// An engine takes a long job or is about to park.
  func leave(_ queues: [DeviceQueue]) {
    ledger.withLock { l in apply(l.leave(), to: queues) }
  }

  /// An idle engine asks to spin. False: another engine spins; park.
  func claimSpinner() -> Bool { ledger.withLock { $0.claimSpinner() } }

  func releaseSpinner() { ledger.withLock { $0.releaseSpinner() } }

  /// After an engine takes a job: wakes one parked engine when the work left
  /// behind it is worth one (`WakeupLedger.shouldWake`).
  func handOff(_ queues: [DeviceQueue], tookLong: Bool) {
    guard let q = queues.max(by: { $0.waitingDescriptors < $1.waitingDescriptors }) else { return }
    let waiting = q.waitingDescriptors
    guard ledger.withLock({ $0.shouldWake(tookLong: tookLong, waiting: waiting) }) else { return }
    q.sqDoorbell.fetchAdd(1)
    q.sqDoorbell.wake(count: 1)
  }

  /// An engine is about to park: with no one attentive the flags go up before
  /// it looks for work one last time.
  func parking(_ queues: [DeviceQueue]) {
    ledger.withLock { l in apply(l.parking(), to: queues) }
  }

  /// An engine woke from a park. The last one to wake takes the flags down: no one is left to ring for.
  func woke(_ queues: [DeviceQueue]) {
    ledger.withLock { l in apply(l.woke(), to: queues) }
  }

  /// Writes the ledger's flags into `queues` (a new snapshot, with queues
  /// added since the last change).
  func sync(_ queues: [DeviceQueue]) {
    ledger.withLock { l in apply(l.flagsUp ? .raise : .lower, to: queues) }
  }

  private func apply(_ flags: WakeupLedger.Flags, to queues: [DeviceQueue]) {
    switch flags {
    case .unchanged:
      return
    case .raise:
      for q in queues { q.sqNeedWakeup.storeSeqCst(1) }
      SharedMemory.fence()
    case .lower:
      for q in queues { q.sqNeedWakeup.storeSeqCst(0) }
    }
  }
}
