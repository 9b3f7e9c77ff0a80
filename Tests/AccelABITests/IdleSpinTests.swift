import AccelABI
import Synchronization
import Testing

/// A clock the test moves by hand, counting its readings.
private final class FakeClock: Sendable {
  private let state = Mutex((now: UInt64(1_000), reads: 0))
  var reads: Int { state.withLock { $0.reads } }
  func advance(_ ns: UInt64) { state.withLock { $0.now += ns } }
  func read() -> UInt64 { state.withLock { $0.reads += 1; return $0.now } }
}

/// One idle round (outside `#expect`, which cannot mutate).
private func spin(_ idle: inout IdleSpin) -> Bool { idle.keepSpinning() }

@Suite struct IdleSpinTests {
  @Test func theClockIsReadOncePerStrideOfIdleRounds() {
    let clock = FakeClock()
    var idle = IdleSpin(spinNanoseconds: 50_000, clock: { clock.read() })
    #expect(clock.reads == 1)  // the start counts as work
    var readings: [UInt64] = []
    for _ in 0..<(IdleSpin.stride * 3) {
      let spinning = idle.keepSpinning { readings.append($0) }
      #expect(spinning)
    }
    #expect(clock.reads == 4)
    #expect(readings == [1_000, 1_000, 1_000])
  }

  @Test func spinningStopsOnTheFirstReadingPastTheBudget() {
    let clock = FakeClock()
    var idle = IdleSpin(spinNanoseconds: 50_000, clock: { clock.read() })
    clock.advance(49_999)
    for _ in 0..<IdleSpin.stride { #expect(spin(&idle)) }  // 49,999 ns: still inside the budget
    clock.advance(1)
    for _ in 1..<IdleSpin.stride { #expect(spin(&idle)) }  // no reading yet
    #expect(!spin(&idle))  // the reading at 50,000 ns ends it
  }

  @Test func workRestartsTheBudgetAndTheStride() {
    let clock = FakeClock()
    var idle = IdleSpin(spinNanoseconds: 10, clock: { clock.read() })
    for _ in 1..<IdleSpin.stride { _ = idle.keepSpinning() }
    clock.advance(100)
    idle.worked()
    #expect(idle.idleRounds == 0)
    #expect(idle.lastWork == 1_100)
    for _ in 1..<IdleSpin.stride { #expect(spin(&idle)) }
    clock.advance(10)
    #expect(!spin(&idle))
  }
}
