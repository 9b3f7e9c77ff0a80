/// The pacing of a polling thread (an engine, the reaper) between its work:
/// spin for `spinNanoseconds` after the last work, then park.
///
/// The clock is read once every `stride` idle rounds, not on every one: a
/// profile of 4 KiB calls on the C-core edge found the spinning engines'
/// `clock_gettime` at about 5 % of the gateway's CPU. With a `pause` per round,
/// a stride of 32 overshoots the spin budget by a few microseconds at most.
public struct IdleSpin: Sendable {
  public let spinNanoseconds: UInt64
  public private(set) var lastWork: UInt64
  /// Idle rounds since the last work.
  public private(set) var idleRounds: UInt32 = 0
  /// Rounds per clock reading.
  public static let stride: UInt32 = 32
  /// The monotonic clock in nanoseconds (a fake one in tests).
  private let clock: @Sendable () -> UInt64

  public init(spinNanoseconds: UInt64, clock: @escaping @Sendable () -> UInt64 = { SharedMemory.nowNanoseconds() }) {
    self.spinNanoseconds = spinNanoseconds
    self.clock = clock
    self.lastWork = clock()
  }

  /// Work was done at `now` (or the thread woke from a park).
  public mutating func worked(now: UInt64? = nil) {
    lastWork = now ?? clock()
    idleRounds = 0
  }

  /// After a round with no work: pauses the CPU and returns true while the spin
  /// budget lasts; false when the thread should park. `clock` is called only on
  /// the rounds that read the time, with the reading, so a caller can run its
  /// timed upkeep (heartbeats, maintenance) at the same cost.
  public mutating func keepSpinning(clock: (UInt64) -> Void = { _ in }) -> Bool {
    idleRounds &+= 1
    if idleRounds % Self.stride != 0 {
      SharedMemory.cpuRelax()
      return true
    }
    let now = self.clock()
    clock(now)
    guard now &- lastWork < spinNanoseconds else { return false }
    SharedMemory.cpuRelax()
    return true
  }
}
