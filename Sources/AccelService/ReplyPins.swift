internal import Synchronization

/// Pool bytes held by each tenant's replies that the C core is still sending,
/// and how long each reply has waited (a pure core: time comes in as `now`).
///
/// A result sent from the device pool in place holds its lease until the
/// core has written the bytes to the socket, so a tenant that never reads its
/// responses would pin device memory for everyone. Two bounds:
/// - past `limit` bytes a tenant's next results are copied out of the pool
///   and their leases freed at once (`take` refuses);
/// - a reply still unsent after the wait bound is ended (`overdue` hands back
///   its `end` action, which cancels the call; the core then releases the
///   bytes and `give` runs).
final class ReplyPins: Sendable {
  /// One reply in flight from the pool.
  struct Pin: Sendable {
    let tenant: String
    let bytes: Int
    let since: ContinuousClock.Instant
    /// Ends the reply's call; run by the shell, at most once.
    let end: @Sendable () -> Void
    var ended = false
  }

  let limit: Int
  private struct State {
    var held: [String: Int] = [:]
    var pins: [UInt64: Pin] = [:]
    var nextTicket: UInt64 = 1
  }
  private let state = Mutex(State())

  init(limit: Int) { self.limit = limit }

  /// Takes `bytes` for `tenant` when they fit under the limit; the ticket gives them back.
  func take(_ bytes: Int, tenant: String, now: ContinuousClock.Instant, end: @escaping @Sendable () -> Void) -> UInt64? {
    state.withLock { s in
      let held = s.held[tenant, default: 0]
      guard held + bytes <= limit else { return nil }
      s.held[tenant] = held + bytes
      let ticket = s.nextTicket
      s.nextTicket += 1
      s.pins[ticket] = Pin(tenant: tenant, bytes: bytes, since: now, end: end)
      return ticket
    }
  }

  /// Gives back what `take` took, once the core is done with the bytes (sent, or the call ended).
  func give(_ ticket: UInt64) {
    state.withLock { s in
      guard let pin = s.pins.removeValue(forKey: ticket) else { return }
      let left = s.held[pin.tenant, default: 0] - pin.bytes
      s.held[pin.tenant] = left > 0 ? left : nil
    }
  }

  /// The replies that have waited longer than `wait` at `now` and are not
  /// ended yet, marked ended: their `end` actions, for the caller to run.
  /// Their bytes stay counted until `give`.
  func overdue(now: ContinuousClock.Instant, after wait: Duration) -> [(tenant: String, end: @Sendable () -> Void)] {
    state.withLock { s in
      var due: [(tenant: String, end: @Sendable () -> Void)] = []
      for (ticket, pin) in s.pins where !pin.ended && now - pin.since > wait {
        s.pins[ticket]?.ended = true
        due.append((pin.tenant, pin.end))
      }
      return due
    }
  }

  /// Bytes held now by `tenant`.
  func holding(_ tenant: String) -> Int { state.withLock { $0.held[tenant, default: 0] } }
  /// Bytes held now by every tenant's replies.
  var totalHeld: Int { state.withLock { $0.held.values.reduce(0, +) } }
}
