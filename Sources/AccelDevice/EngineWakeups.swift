internal import AccelABI
internal import Synchronization

/// Which engines spin, which are parked, and so when the driver must ring a
/// queue's doorbell (`sq_need_wakeup`).
///
/// At most one engine spins while idle; the others park at once. On two cores
/// shared with the gateway, two spinning engines took CPU from the threads that
/// feed them: a 4 KiB SHA-256 load ran at 13 k calls/s with two engines and
/// 18 k with one (issue 18, part 5). A backlog still reaches every engine: an
/// engine that takes a job while more are waiting, and no engine spins, wakes
/// a parked one (`cascade`), and so on down the line.
///
/// The need-wakeup flags are up exactly while some engine is parked and none
/// spins. Each change keeps the Dekker pair with the driver (it stores
/// `sq_tail`, fences, loads the flag; the device stores the flag, fences, loads
/// `sq_tail`), so no job waits for a park timeout: work published while the
/// flags were down is seen by the spinner, by the engine that stops spinning
/// (`stopSpinning`, then `cascade`), or by an engine on its way to park.
final class EngineWakeups: Sendable {
  private let spinning = Atomic<Bool>(false)
  private let parked = Atomic<Int>(0)

  /// An idle engine asks to spin. True: it is now the spinner, and the flags are
  /// down (it will see new work itself). False: another engine spins; park.
  func startSpinning(_ queues: [DeviceQueue]) -> Bool {
    guard spinning.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged
    else { return false }
    for q in queues { q.sqNeedWakeup.storeSeqCst(0) }
    return true
  }

  /// The spinner stops (it found work, or its spin budget ran out). With an
  /// engine parked, the flags go back up, so the driver rings for what comes next.
  func stopSpinning(_ queues: [DeviceQueue]) {
    spinning.store(false, ordering: .sequentiallyConsistent)
    guard parked.load(ordering: .sequentiallyConsistent) > 0 else { return }
    for q in queues { q.sqNeedWakeup.storeSeqCst(1) }
    SharedMemory.fence()
  }

  /// After an engine takes a job: when more work waits and no engine spins,
  /// wakes one parked engine for it.
  func cascade(_ queues: [DeviceQueue]) {
    guard parked.load(ordering: .sequentiallyConsistent) > 0, !spinning.load(ordering: .sequentiallyConsistent),
      let q = queues.first(where: { $0.hasPendingWork })
    else { return }
    q.sqDoorbell.fetchAdd(1)
    q.sqDoorbell.wake(count: 1)
  }

  /// An engine is about to park: the flags go up before it looks for work one last time.
  func parking(_ queues: [DeviceQueue]) {
    parked.add(1, ordering: .sequentiallyConsistent)
    for q in queues { q.sqNeedWakeup.storeSeqCst(1) }
    SharedMemory.fence()
  }

  /// An engine woke from a park. The last one to wake takes the flags down: no one is left to ring for.
  func woke(_ queues: [DeviceQueue]) {
    guard parked.subtract(1, ordering: .sequentiallyConsistent).newValue == 0 else { return }
    for q in queues { q.sqNeedWakeup.storeSeqCst(0) }
  }
}
