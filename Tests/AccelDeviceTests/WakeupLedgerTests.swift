import Testing

@testable import AccelDevice

/// The pure core behind the device's doorbell flags (issue 18, part 5): exact
/// decisions for the sequences two engines go through.
@Suite struct WakeupLedgerTests {
  /// Engine 0 spins and runs 4 KiB jobs; engine 1 is parked. The flags stay down
  /// and engine 1 is never woken: a trickle of short jobs needs one engine.
  @Test func aTrickleOfShortJobsStaysOnTheAttentiveEngine() {
    var l = WakeupLedger()
    let r1 = l.parking()
    #expect(r1 == .raise)  // engine 1
    #expect(l.flagsUp)
    let r2 = l.claimSpinner()
    #expect(r2)
    let r3 = l.attend()
    #expect(r3 == .lower)
    #expect(!l.flagsUp)
    for waiting in [0, 1, 5, 15] as [UInt32] {
      l.releaseSpinner()  // found a job; still attentive
      #expect(!l.policy.isLong(inputBytes: 4096))
      #expect(!l.shouldWake(tookLong: false, waiting: waiting))
      let r4 = l.claimSpinner()
      #expect(r4)  // back to spinning
    }
    #expect(!l.flagsUp)
  }

  /// Engine 0 takes a 1 MiB job with more work waiting and no one else watching:
  /// the flags go up and engine 1 is woken for the rest.
  @Test func aLongJobHandsTheWaitingWorkToAParkedEngine() {
    var l = WakeupLedger()
    let r5 = l.parking()
    #expect(r5 == .raise)  // engine 1
    let r6 = l.attend()
    #expect(r6 == .lower)  // engine 0 spinning
    #expect(l.policy.isLong(inputBytes: 1 << 20))
    let r7 = l.leave()
    #expect(r7 == .raise)
    #expect(l.shouldWake(tookLong: true, waiting: 1))
    #expect(!l.shouldWake(tookLong: true, waiting: 0), "nothing waits: nothing to wake for")
  }

  /// While another engine is attentive, a long job wakes no one: the attentive
  /// engine takes what waits.
  @Test func aLongJobWakesNoOneWhileAnotherEngineWatches() {
    var l = WakeupLedger()
    let r8 = l.parking()
    #expect(r8 == .raise)  // engine 2
    let r9 = l.attend()
    #expect(r9 == .lower)  // engine 0
    let r10 = l.attend()
    #expect(r10 == .unchanged)  // engine 1
    let r11 = l.leave()
    #expect(r11 == .unchanged)  // engine 0 takes a long job
    #expect(!l.shouldWake(tookLong: true, waiting: 4))
    let r12 = l.leave()
    #expect(r12 == .raise)  // engine 1 parks too
    #expect(l.shouldWake(tookLong: true, waiting: 4))
  }

  /// A deep backlog wakes a parked engine even when its jobs are short.
  @Test func aDeepBacklogWakesAParkedEngine() {
    var l = WakeupLedger(policy: .init(longJobBytes: 64 << 10, backlogDescriptors: 32))
    let r13 = l.parking()
    #expect(r13 == .raise)
    let r14 = l.attend()
    #expect(r14 == .lower)
    #expect(!l.shouldWake(tookLong: false, waiting: 31))
    #expect(l.shouldWake(tookLong: false, waiting: 32))
    let r15 = l.woke()
    #expect(r15 == .unchanged)
    #expect(!l.shouldWake(tookLong: false, waiting: 200), "no engine is parked")
  }

  /// One spinning place; the flags follow the attentive count, never below zero.
  @Test func oneSpinnerAndFlagsThatFollowTheCount() {
    var l = WakeupLedger()
    let r16 = l.claimSpinner()
    #expect(r16)
    let r17 = l.claimSpinner()
    #expect(!r17)
    l.releaseSpinner()
    let r18 = l.claimSpinner()
    #expect(r18)
    let r19 = l.leave()
    #expect(r19 == .unchanged, "never below zero")
    #expect(l.attentive == 0)
    #expect(l.policy.isLong(inputBytes: 64 << 10))
    #expect(!l.policy.isLong(inputBytes: 64 << 10 - 1))
  }

  /// With every engine on a long job no one is parked, so the flags stay down:
  /// a ring would be a futex call with no one to wake. The first engine to
  /// park raises them; the last to wake takes them down.
  @Test func theFlagsAreDownWhileNoEngineIsParked() {
    var l = WakeupLedger()
    let r20 = l.attend()
    #expect(r20 == .unchanged)
    let r21 = l.attend()
    #expect(r21 == .unchanged)
    let r22 = l.leave()
    #expect(r22 == .unchanged)  // both on long jobs
    let r23 = l.leave()
    #expect(r23 == .unchanged)
    #expect(!l.flagsUp)
    let r24 = l.parking()
    #expect(r24 == .raise)
    let r25 = l.parking()
    #expect(r25 == .unchanged)
    let r26 = l.woke()
    #expect(r26 == .unchanged)
    let r27 = l.woke()
    #expect(r27 == .lower)
  }
}
