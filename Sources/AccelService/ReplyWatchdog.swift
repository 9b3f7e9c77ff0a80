internal import Foundation
internal import Synchronization

/// The shell around `ReplyPins`' wait bound: a thread that wakes a few times
/// per bound and ends the calls whose replies have waited too long in the C
/// core (a client that stopped reading). It sleeps between rounds; nothing
/// else runs on it.
final class ReplyWatchdog: Sendable {
  private let pins: ReplyPins
  private let wait: Duration
  private let stopped = DispatchSemaphore(value: 0)
  private let done = DispatchSemaphore(value: 0)
  private let running = Atomic<Bool>(false)

  init(pins: ReplyPins, wait: Duration) {
    self.pins = pins
    self.wait = wait
  }

  /// How often it looks: a quarter of the bound, at most once a second, at least every 10 ms.
  var interval: Duration { min(.seconds(1), max(.milliseconds(10), wait / 4)) }

  func start() {
    guard !running.exchange(true, ordering: .acquiringAndReleasing) else { return }
    let t = Thread { [self] in
      Thread.current.name = "reply-watchdog"
      let seconds = Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18
      while stopped.wait(timeout: .now() + seconds) == .timedOut {
        for pin in pins.overdue(now: .now, after: wait) { pin.end() }
      }
      done.signal()
    }
    t.start()
  }

  func stop() {
    guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
    stopped.signal()
    done.wait()
  }
}
