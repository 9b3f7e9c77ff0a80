package import AccelDriver
internal import Synchronization

/// Why a payload was not staged. The gRPC layer then decodes it the ordinary
/// way (into memory, copied into the pool at dispatch).
package enum StagingRefusal: String, Error, Sendable, CaseIterable {
  /// No staging zone is configured (network lane off, or a pool too small for one).
  case off
  /// The tenant already holds its share of the staging zones.
  case tenantShare = "tenant_share"
  /// No queue's staging zone has a free extent that large.
  case poolFull = "pool_full"
  /// Larger than the method's payload limit (the call will be refused anyway).
  case tooLarge = "too_large"
  /// The device is detached or no queue is healthy.
  case unavailable
}

/// Staged bytes per tenant (rounded to the pool's allocation unit), and when
/// each tenant last asked to stage.
struct StagingLedger {
  var byTenant: [String: UInt64] = [:]
  var lastAsked: [String: ContinuousClock.Instant] = [:]

  /// Tenants competing for the zones now: those holding staged bytes, and
  /// those that asked within `window` (a tenant refused for lack of space
  /// holds nothing, yet must shrink the others' shares so space comes back to it).
  func contenders(now: ContinuousClock.Instant, window: Duration, including tenant: String) -> Int {
    var n = byTenant.count
    for (t, at) in lastAsked where byTenant[t] == nil && t != tenant && now - at < window { n += 1 }
    return n + (byTenant[tenant] == nil ? 1 : 0)
  }

  mutating func asked(_ tenant: String, at now: ContinuousClock.Instant, window: Duration) {
    lastAsked[tenant] = now
    if lastAsked.count > 1024 { lastAsked = lastAsked.filter { now - $0.value < window } }
  }
}

extension Dispatcher {
  /// Network lane: takes a buffer for a request's payload in the staging zone of
  /// one queue's pool, before the job exists, so the gRPC layer can decode the
  /// payload straight into it. The job made from it (`JobRequest.stagedInput`)
  /// then runs on that queue. Synchronous and quick: it runs in a message
  /// deserializer, before the handler.
  ///
  /// Pool protection (docs/NETWORK_LANE.md):
  /// - staged payloads lie only in each pool's staging zone (its top
  ///   `stagingZoneBytes`), so the rest of the pool always holds the largest
  ///   job and dispatch never waits on payloads that are themselves waiting;
  /// - a tenant may hold at most the zones' total divided by the number of
  ///   tenants competing for them (holding staged bytes, or having asked within
  ///   `stagingContenderWindow`; itself included), so a flooding tenant cannot
  ///   pin the zones: past its share its payloads are refused here and take the
  ///   ordinary copy path, and space it frees goes to the others.
  ///
  /// The buffer counts against the tenant until it goes back to the pool: with
  /// its job's lease (after the job, or after the caller wrote a pooled result
  /// out), or released unused (the call ended without a job: refused,
  /// cancelled, expired, failed). Counting the whole time the bytes lie in a
  /// zone, not just while they wait, is what leaves room for other tenants.
  package func stageInput(length: Int, tenant: String, sensitive: Bool) -> Result<StagedInput, StagingRefusal> {
    guard configuration.stagingZoneBytes > 0 else { return .failure(.off) }
    guard isAttached else { return .failure(.unavailable) }
    let zoned = driver.queues.map { ($0, $0.stagingZoneBytes) }.filter { $0.1 > 0 }
    guard !zoned.isEmpty else { return .failure(.off) }
    let queues = zoned.filter { $0.0.isHealthy }
    guard let first = queues.first?.0 else { return .failure(.unavailable) }
    let need = first.poolFootprint(UInt64(length))
    let fitting = queues.filter { $0.1 >= need }
    guard !fitting.isEmpty else { return .failure(.poolFull) }
    // Shares are of every zone, healthy or not, so they do not shrink while a queue resets.
    let total = zoned.reduce(0) { $0 + $1.1 }
    let now = ContinuousClock.now
    let window = configuration.stagingContenderWindow
    // Claim the tenant's bytes first (never holding this lock while taking a queue's).
    let refusal = stagingLedger.withLock { l -> StagingRefusal? in
      let mine = l.byTenant[tenant] ?? 0
      let contenders = UInt64(l.contenders(now: now, window: window, including: tenant))
      l.asked(tenant, at: now, window: window)
      // Alone, the share is every zone: a refusal then means no room.
      guard mine + need <= total / max(1, contenders) else { return contenders > 1 ? .tenantShare : .poolFull }
      l.byTenant[tenant] = mine + need
      return nil
    }
    if let refusal { return .failure(refusal) }
    // The queue with the fewest staged bytes first: staged jobs are pinned to their queue.
    let order = fitting.map { ($0.0, $0.0.stagedBytes) }.sorted { $0.1 < $1.1 }.map(\.0)
    for q in order {
      if let staged = q.stageInput(
        length: length, sensitive: sensitive,
        onSettle: { [weak self] _ in self?.settleStaged(tenant: tenant, bytes: need) })
      {
        return .success(staged)
      }
    }
    settleStaged(tenant: tenant, bytes: need)
    return .failure(.poolFull)
  }

  private func settleStaged(tenant: String, bytes: UInt64) {
    stagingLedger.withLock { l in
      let left = (l.byTenant[tenant] ?? 0) - min(l.byTenant[tenant] ?? 0, bytes)
      l.byTenant[tenant] = left == 0 ? nil : left
    }
  }

  /// Zone bytes a tenant holds in staged payloads (waiting or on the device).
  package func stagedBytes(tenant: String) -> UInt64 { stagingLedger.withLock { $0.byTenant[tenant] ?? 0 } }

  /// Staged bytes by tenant, for metrics.
  package var stagedBytesByTenant: [String: UInt64] { stagingLedger.withLock { $0.byTenant } }
}
