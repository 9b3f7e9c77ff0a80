/// The decisions behind the device's doorbell flags, with no shared memory and
/// no threads: a pure core that `EngineWakeups` runs under its lock.
///
/// An engine is *attentive* while it spins idle or runs a short job: either
/// way it looks at the submission rings again within microseconds, so the
/// driver need not ring. It stops being attentive when it takes a long job or
/// parks. The need-wakeup flags are up exactly while no engine is attentive
/// and one is parked: with every engine on a long job there is no one to wake,
/// and a ring would cost the driver a futex call for nothing.
///
/// On two cores shared with the gateway, the old rule (flags up while any
/// engine was parked and none spun) rang a parked engine for almost every 4 KiB
/// job that arrived while the spinner was busy for a few microseconds; the
/// second engine's wake-ups cost as much CPU as the jobs (issue 18, part 5).
/// Now a trickle of short jobs stays on the attentive engine, and a parked
/// engine is woken for a long job, a deep backlog, or when no one is left.
package struct WakeupLedger: Sendable, Equatable {
  /// When work is worth a second engine.
  package struct Policy: Sendable, Equatable {
    /// A job whose first descriptor has at least this much input is long: its
    /// engine is away from the rings for tens of microseconds or more.
    package var longJobBytes: UInt32 = 64 << 10
    /// Descriptors waiting behind a taken job that wake a parked engine even
    /// when the jobs are short.
    package var backlogDescriptors: UInt32 = 32

    package init(longJobBytes: UInt32 = 64 << 10, backlogDescriptors: UInt32 = 32) {
      self.longJobBytes = longJobBytes
      self.backlogDescriptors = backlogDescriptors
    }

    /// Whether a job whose first descriptor reads `inputBytes` is long.
    package func isLong(inputBytes: UInt32) -> Bool { inputBytes >= longJobBytes }
  }

  /// What to do with the queues' need-wakeup flags after a change.
  package enum Flags: Sendable, Equatable {
    case unchanged
    /// No engine is attentive any more: the driver must ring for new work.
    case raise
    /// An engine is attentive again: it will see new work by itself.
    case lower
  }

  package let policy: Policy
  /// Engines spinning idle or running a short job.
  package private(set) var attentive = 0
  /// Engines asleep on the doorbells (or on their way there).
  package private(set) var parked = 0
  /// Whether an idle engine holds the one spinning place.
  package private(set) var spinnerClaimed = false

  package init(policy: Policy = Policy()) { self.policy = policy }

  /// Whether the flags should be up now.
  package var flagsUp: Bool { attentive == 0 && parked > 0 }

  /// An engine begins to spin idle or to run a short job.
  package mutating func attend() -> Flags { change { $0.attentive += 1 } }

  /// An engine takes a long job or leaves to park.
  package mutating func leave() -> Flags { change { $0.attentive = max(0, $0.attentive - 1) } }

  /// An idle engine asks for the spinning place. False: another engine spins; park.
  package mutating func claimSpinner() -> Bool {
    guard !spinnerClaimed else { return false }
    spinnerClaimed = true
    return true
  }

  package mutating func releaseSpinner() { spinnerClaimed = false }

  /// An engine is about to sleep on the doorbells.
  package mutating func parking() -> Flags { change { $0.parked += 1 } }

  /// An engine woke up.
  package mutating func woke() -> Flags { change { $0.parked = max(0, $0.parked - 1) } }

  private mutating func change(_ body: (inout Self) -> Void) -> Flags {
    let before = flagsUp
    body(&self)
    switch (before, flagsUp) {
    case (false, true): return .raise
    case (true, false): return .lower
    default: return .unchanged
    }
  }

  /// Whether a parked engine should be woken after an engine took a job
  /// (`tookLong` when it was long) with `waiting` descriptors left behind it.
  package func shouldWake(tookLong: Bool, waiting: UInt32) -> Bool {
    guard parked > 0, waiting > 0 else { return false }
    if waiting >= policy.backlogDescriptors { return true }
    return tookLong && attentive == 0
  }
}
