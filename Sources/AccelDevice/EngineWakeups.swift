internal import AccelABI
internal import Synchronization

/// The shell around `WakeupLedger`: it keeps the ledger under a lock, writes
/// its decisions into the queues' `sq_need_wakeup` flags and doorbells, and
/// owns the reserve word that engines in the reserve sleep on.
///
/// Every flag change keeps the Dekker pair with the driver (it stores
/// `sq_tail`, fences, loads the flag; the device stores the flag, fences, loads
/// `sq_tail`), so no job waits for a park timeout: work published while the
/// flags were down is seen by an attentive engine, by the engine that stops
/// being attentive (it raises the flags, then hands what waits to a sleeper),
/// or by an engine on its way to park (it looks once more before it sleeps).
final class EngineWakeups: Sendable {
  private let ledger: Mutex<WakeupLedger>
  /// The ledger's policy, immutable, kept here so the job path reads it without the lock.
  let policy: WakeupLedger.Policy
  /// The reserve's futex word: device-private memory, never in a queue region.
  let reserve: SharedWord

  init(policy: WakeupLedger.Policy = WakeupLedger.Policy()) {
    self.policy = policy
    ledger = Mutex(WakeupLedger(policy: policy))
    let word = UnsafeMutablePointer<UInt32>.allocate(capacity: 1)
    word.initialize(to: 0)
    reserve = SharedWord(word)
  }

  deinit { reserve.pointer.deallocate() }

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

  /// After an engine takes a job: wakes the sleeper the ledger names, if any.
  /// On the job path: one read of each queue's indexes, one uncontended lock.
  func handOff(_ queues: [DeviceQueue], tookLong: Bool) {
    var busiest: DeviceQueue?
    var waiting: UInt32 = 0
    for q in queues {
      let w = q.waitingDescriptors
      if w > waiting { (busiest, waiting) = (q, w) }
    }
    switch ledger.withLock({ $0.wake(afterTaking: tookLong, waiting: waiting) }) {
    case .none:
      return
    case .reserve:
      reserve.fetchAdd(1)
      reserve.wake(count: 1)
    case .doorbells:
      // Named only for waiting work, so `busiest` is set.
      guard let busiest else { return }
      busiest.sqDoorbell.fetchAdd(1)
      busiest.sqDoorbell.wake(count: 1)
    }
  }

  /// An engine is about to park: where it sleeps, and the reserve word's value
  /// read under the lock (a wake decided after this bumps it, so the sleep
  /// cannot miss it). With no one attentive, the flags go up first.
  func parking(_ queues: [DeviceQueue]) -> (bed: WakeupLedger.Bed, reserveSeen: UInt32) {
    ledger.withLock { l in
      let (bed, flags) = l.parking()
      apply(flags, to: queues)
      return (bed, reserve.loadAcquire())
    }
  }

  /// An engine woke from `bed`.
  func woke(_ queues: [DeviceQueue], from bed: WakeupLedger.Bed) {
    ledger.withLock { l in apply(l.woke(from: bed), to: queues) }
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
