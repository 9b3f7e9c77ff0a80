import Testing

@testable import AccelDevice

/// The pure core behind the device's doorbell flags and engine sleep (issue 18,
/// part 5): exact decisions for the sequences engines go through.
@Suite struct WakeupLedgerTests {
  /// Two engines at rest: the first to park sleeps on the doorbells (where the
  /// driver's ring reaches), the second in the reserve.
  @Test func theFirstToParkSleepsOnTheDoorbellsTheNextInTheReserve() {
    var l = WakeupLedger()
    let first = l.parking()
    #expect(first.0 == .doorbells)
    #expect(first.1 == .raise)
    let second = l.parking()
    #expect(second.0 == .reserve)
    #expect(second.1 == .unchanged)
    #expect(l.flagsUp)
    let woke = l.woke(from: .doorbells)
    #expect(woke == .lower, "no one left where a ring reaches")
  }

  /// Engine 0 spins and runs 4 KiB jobs; engine 1 sleeps in the reserve. The
  /// flags stay down and no one is woken: a trickle of short jobs needs one engine.
  @Test func aTrickleOfShortJobsStaysOnOneEngine() {
    var l = WakeupLedger()
    _ = l.parking()  // engine 0, on the doorbells
    _ = l.parking()  // engine 1, in the reserve
    let rung = l.woke(from: .doorbells)  // the driver rang engine 0
    #expect(rung == .lower)
    #expect(!l.policy.isLong(inputBytes: 4096))
    let attended = l.attend()  // engine 0 takes a short job
    #expect(attended == .unchanged)
    for waiting in [0, 1, 5, 15, 31] as [UInt32] {
      #expect(l.wake(afterTaking: false, waiting: waiting) == .none)
    }
    let spins = l.claimSpinner()
    #expect(spins)
    let left = l.leave()  // the spin ran out
    #expect(left == .unchanged)
    l.releaseSpinner()
    let parked = l.parking()  // engine 0 again, back on the doorbells
    #expect(parked.0 == .doorbells)
    #expect(parked.1 == .raise)
    #expect(l.reserveSleepers == 1, "engine 1 never woke")
  }

  /// Engine 0 takes a 1 MiB job with more work waiting and no one else
  /// watching: the reserve engine is woken for the rest.
  @Test func aLongJobHandsTheWaitingWorkToTheReserve() {
    var l = WakeupLedger()
    _ = l.parking()
    _ = l.parking()
    _ = l.woke(from: .doorbells)  // engine 0 rung
    #expect(l.policy.isLong(inputBytes: 1 << 20))
    #expect(l.wake(afterTaking: true, waiting: 3) == .reserve)
  }

  /// A long job with nothing waiting and no one on the doorbells still
  /// promotes the reserve engine: new work must be rung for while engine 0 is away.
  @Test func aLongJobPromotesTheReserveWhenNoOneIsOnTheDoorbells() {
    var l = WakeupLedger()
    _ = l.parking()
    _ = l.parking()
    _ = l.woke(from: .doorbells)
    #expect(l.wake(afterTaking: true, waiting: 0) == .reserve)
    _ = l.woke(from: .reserve)  // engine 1 looks, finds nothing, parks
    let parked = l.parking()
    #expect(parked == (.doorbells, .raise))
    #expect(l.wake(afterTaking: true, waiting: 0) == .none, "the doorbells are watched")
    #expect(l.wake(afterTaking: true, waiting: 2) == .doorbells, "work waits: ring the doorbell sleeper")
  }

  /// While another engine is attentive, a long job wakes no one: the attentive
  /// engine takes what waits.
  @Test func aLongJobWakesNoOneWhileAnotherEngineWatches() {
    var l = WakeupLedger()
    _ = l.parking()  // engine 2
    let spinning = l.attend()  // engine 0
    #expect(spinning == .lower)
    _ = l.attend()  // engine 1 on a short job
    let tookLong = l.leave()  // engine 0 takes a long job
    #expect(tookLong == .unchanged)
    #expect(l.wake(afterTaking: true, waiting: 4) == .none)
    let alone = l.leave()  // engine 1 takes a long job too
    #expect(alone == .raise)
    #expect(l.wake(afterTaking: true, waiting: 4) == .doorbells)
  }

  /// A deep backlog wakes a sleeper even when its jobs are short, the reserve first.
  @Test func aDeepBacklogWakesASleeper() {
    var l = WakeupLedger(policy: .init(longJobBytes: 64 << 10, backlogDescriptors: 32))
    _ = l.parking()
    _ = l.parking()
    _ = l.attend()
    #expect(l.wake(afterTaking: false, waiting: 31) == .none)
    #expect(l.wake(afterTaking: false, waiting: 32) == .reserve)
    _ = l.woke(from: .reserve)
    #expect(l.wake(afterTaking: false, waiting: 32) == .doorbells)
    _ = l.woke(from: .doorbells)
    #expect(l.wake(afterTaking: false, waiting: 200) == .none, "no engine sleeps")
  }

  /// With every engine on a long job no one sleeps, so the flags stay down: a
  /// ring would be a futex call with no one to wake.
  @Test func theFlagsAreDownWhileNoEngineSleepsOnTheDoorbells() {
    var l = WakeupLedger()
    _ = l.attend()
    _ = l.attend()
    let first = l.leave()
    let second = l.leave()
    #expect(first == .unchanged)
    #expect(second == .unchanged)
    #expect(!l.flagsUp)
    let leaveAgain = l.leave()
    #expect(leaveAgain == .unchanged, "never below zero")
    #expect(l.attentive == 0)
  }

  /// One spinning place.
  @Test func oneSpinner() {
    var l = WakeupLedger()
    let first = l.claimSpinner()
    let second = l.claimSpinner()
    l.releaseSpinner()
    let again = l.claimSpinner()
    #expect(first)
    #expect(!second)
    #expect(again)
    #expect(l.policy.isLong(inputBytes: 64 << 10))
    #expect(!l.policy.isLong(inputBytes: 64 << 10 - 1))
  }
}
