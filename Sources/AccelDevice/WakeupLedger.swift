/// The decisions behind the device's doorbell flags and its engines' sleep,
/// with no shared memory and no threads: a pure core that `EngineWakeups` runs
/// under its lock.
///
/// An engine is *attentive* while it spins idle or runs a short job: either
/// way it looks at the submission rings again within microseconds, so the
/// driver need not ring. It stops being attentive when it takes a long job or
/// parks.
///
/// A parking engine sleeps in one of two beds. The first to park sleeps on the
/// queues' doorbells, where the driver's ring reaches it; any other sleeps in
/// the *reserve*, which only another engine can ring. So a trickle of short
/// jobs keeps waking the same engine, warm, and a second engine runs only when
/// an engine takes a long job or sees a deep backlog. On two cores shared with
/// the gateway, waking whichever engine the futex picked cost as much CPU as
/// 4 KiB jobs themselves, and `--engines 1` ran them 13–33 % faster (issue 18,
/// part 5).
///
/// The need-wakeup flags are up exactly while no engine is attentive and one
/// sleeps on the doorbells. With every engine on a long job there is no one
/// the ring could reach, and it would cost the driver a futex call for nothing.
package struct WakeupLedger: Sendable, Equatable {
  /// When work is worth a second engine.
  package struct Policy: Sendable, Equatable {
    /// A job whose first descriptor has at least this much input is long: its
    /// engine is away from the rings for tens of microseconds or more.
    package var longJobBytes: UInt32
    /// Descriptors waiting behind a taken job that wake a parked engine even
    /// when the jobs are short.
    package var backlogDescriptors: UInt32

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
    /// No engine is attentive, and one sleeps on the doorbells: the driver must ring for new work.
    case raise
    /// No ring is needed: an engine is attentive again, or none sleeps where a ring reaches.
    case lower
  }

  /// Where a parking engine sleeps.
  package enum Bed: Sendable, Equatable {
    /// On the queues' doorbells: the driver's ring wakes it.
    case doorbells
    /// On the device's private reserve word: only another engine wakes it.
    case reserve
  }

  /// Which sleeper, if any, an engine that just took a job should wake.
  package enum Wake: Sendable, Equatable {
    case none
    case reserve
    /// The doorbell sleeper, through a queue's doorbell.
    case doorbells
  }

  package let policy: Policy
  /// Engines spinning idle or running a short job.
  package private(set) var attentive = 0
  /// Engines asleep on the doorbells (or on their way there); at most one, but counted.
  package private(set) var doorbellSleepers = 0
  /// Engines asleep in the reserve.
  package private(set) var reserveSleepers = 0
  /// Whether an idle engine holds the one spinning place.
  package private(set) var spinnerClaimed = false

  package init(policy: Policy = Policy()) { self.policy = policy }

  /// Whether the flags should be up now.
  package var flagsUp: Bool { attentive == 0 && doorbellSleepers > 0 }

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

  /// An engine is about to sleep: on the doorbells if no one sleeps there, else in the reserve.
  package mutating func parking() -> (Bed, Flags) {
    var bed = Bed.reserve
    let flags = change { l in
      if l.doorbellSleepers == 0 {
        bed = .doorbells
        l.doorbellSleepers += 1
      } else {
        l.reserveSleepers += 1
      }
    }
    return (bed, flags)
  }

  /// An engine woke up from `bed`.
  package mutating func woke(from bed: Bed) -> Flags {
    change { l in
      switch bed {
      case .doorbells: l.doorbellSleepers = max(0, l.doorbellSleepers - 1)
      case .reserve: l.reserveSleepers = max(0, l.reserveSleepers - 1)
      }
    }
  }

  private mutating func change(_ body: (inout Self) -> Void) -> Flags {
    let before = flagsUp
    body(&self)
    switch (before, flagsUp) {
    case (false, true): return .raise
    case (true, false): return .lower
    default: return .unchanged
    }
  }

  /// Whom to wake after an engine took a job (`tookLong` when it was long) with
  /// `waiting` descriptors left behind it, once its own attention is settled.
  ///
  /// - A deep backlog wakes a sleeper, whatever the jobs.
  /// - A long job with no engine attentive wakes a sleeper for the work
  ///   waiting, and with no one left on the doorbells promotes a reserve
  ///   sleeper (it looks at the rings, then parks on the doorbells), so new
  ///   work is rung for while this engine is away.
  /// - The reserve goes first: the doorbell sleeper stays where the ring reaches.
  package func wake(afterTaking tookLong: Bool, waiting: UInt32) -> Wake {
    let deep = waiting >= policy.backlogDescriptors
    let unwatched = tookLong && attentive == 0
    let forWork = waiting > 0 && (deep || unwatched)
    let forWatch = unwatched && doorbellSleepers == 0
    guard forWork || forWatch else { return .none }
    if reserveSleepers > 0 { return .reserve }
    return forWork && doorbellSleepers > 0 ? .doorbells : .none
  }
}
