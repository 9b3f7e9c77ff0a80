/// A job waiting to be dispatched, as the scheduler sees it: who pays and how much.
/// The scheduler is pure logic: it never sees payloads, devices or clocks it
/// does not get told about.
public struct QueuedJob: Sendable, Equatable {
  /// Caller-unique job identifier.
  public var id: UInt64
  /// Tenant that pays for the job.
  public var tenant: String
  /// Estimated device time in nanoseconds; the charge is corrected at completion.
  public var cost: UInt64
  /// The ordered chain the job belongs to (a stream's slices), or 0 for none.
  /// See `JobChains`.
  public var chain: UInt64
  /// The job's place in its chain.
  public var sequence: UInt64

  public init(id: UInt64, tenant: String, cost: UInt64, chain: UInt64 = 0, sequence: UInt64 = 0) {
    self.id = id
    self.tenant = tenant
    self.cost = cost
    self.chain = chain
    self.sequence = sequence
  }
}

/// Ordered chains of jobs: the slices of a stream, which share one device context
/// and so must run one at a time and in order.
///
/// A chain admits exactly one sequence number at a time. Dispatching that job
/// closes the chain; its completion reopens it for the next number (or for the
/// same number again, when the slice must be continued). Jobs of a chain may be
/// queued ahead of their turn — a stream reads ahead so that its next slice is
/// already waiting when the previous one completes — and the scheduler passes
/// over them, to the tenant's next eligible job, until their turn comes.
/// That keeps a stream backlogged, so it can claim its weight's share of
/// device time, while its context is never used by two engines at once.
public struct JobChains: Sendable, Equatable {
  /// Chain → the sequence number it admits next; nil while one of its jobs runs.
  private var admits: [UInt64: UInt64?] = [:]

  public init() {}

  /// Whether the chain exists (opened and not yet ended).
  public func isOpen(_ chain: UInt64) -> Bool { admits[chain] != nil }

  /// Whether `job` may be dispatched now.
  public func isEligible(_ job: QueuedJob) -> Bool {
    guard job.chain != 0 else { return true }
    guard let next = admits[job.chain], let next else { return false }
    return next == job.sequence
  }

  /// Starts a chain whose first job has sequence `first`.
  public mutating func open(_ chain: UInt64, first: UInt64 = 0) { admits[chain] = .some(first) }
  /// A job of the chain was dispatched: nothing else of it runs until `admit`.
  mutating func dispatched(_ job: QueuedJob) { if job.chain != 0, admits[job.chain] != nil { admits[job.chain] = .some(nil) } }
  /// Lets the chain's job with `sequence` go next.
  public mutating func admit(_ chain: UInt64, sequence: UInt64) { if admits[chain] != nil { admits[chain] = .some(sequence) } }
  /// Blocks the chain until `admit` (a failed slice: what follows must not run).
  public mutating func block(_ chain: UInt64) { if admits[chain] != nil { admits[chain] = .some(nil) } }
  /// Forgets the chain; its queued jobs stay ineligible until removed.
  public mutating func end(_ chain: UInt64) { admits[chain] = nil }
  /// Chains open.
  public var count: Int { admits.count }
}

/// The policy that decides which waiting job goes to the device next.
///
/// The dispatcher calls `peek` to see the next job, checks that the device has
/// room for it, and only then `pop`s it, so a job that does not fit yet keeps
/// its place. Implementations are not thread-safe; the dispatcher serialises calls.
public protocol JobScheduler: Sendable {
  /// Jobs waiting.
  var count: Int { get }
  /// Adds a job at time `now` (nanoseconds on the dispatcher's clock).
  mutating func enqueue(_ job: QueuedJob, now: UInt64)
  /// The job that `pop` would return.
  func peek() -> QueuedJob?
  /// Removes and returns the next job to dispatch.
  mutating func pop(now: UInt64) -> QueuedJob?
  /// Removes a waiting job (cancelled or expired). Nil if it is not waiting.
  mutating func remove(id: UInt64) -> QueuedJob?
  /// Tells the scheduler what a dispatched job really cost.
  mutating func complete(_ job: QueuedJob, actualCost: UInt64, now: UInt64)
  /// Sets a tenant's weight. Schedulers without weights ignore it.
  mutating func setWeight(_ weight: UInt32, for tenant: String)
  /// Ordered chains (stream slices); `peek` and `pop` only return eligible jobs,
  /// and `pop` closes the chain of the job it returns.
  var chains: JobChains { get set }
}

extension JobScheduler {
  public mutating func setWeight(_ weight: UInt32, for tenant: String) {}
}

/// A tenant as the scheduling layer sees it: who, how much weight, what bounds.
public struct TenantPolicy: Sendable, Equatable {
  public var id: String
  public var weight: UInt32
  public var limits: TenantLimits
  public init(id: String, weight: UInt32 = 1, limits: TenantLimits = .defaults) {
    self.id = id
    self.weight = weight
    self.limits = limits
  }
}

/// Which policy orders waiting jobs.
public enum SchedulerKind: String, Sendable, CaseIterable {
  /// Weighted fair queuing by device time (`FairScheduler`).
  case fair
  /// Arrival order (`FIFOScheduler`), for comparison.
  case fifo
}

/// First come, first served: the baseline, and `--scheduler fifo`.
public struct FIFOScheduler: JobScheduler {
  public var chains = JobChains()
  private var ring: [QueuedJob?] = []
  private var head = 0
  private var positions: [UInt64: Int] = [:]

  public init() {}

  public var count: Int { positions.count }

  public mutating func enqueue(_ job: QueuedJob, now: UInt64) {
    positions[job.id] = ring.count
    ring.append(job)
  }

  /// Position of the oldest job that may run now (chained jobs wait for their turn).
  private func firstEligible() -> Int? {
    var i = head
    while i < ring.count {
      if let j = ring[i], chains.isEligible(j) { return i }
      i += 1
    }
    return nil
  }

  public func peek() -> QueuedJob? { firstEligible().flatMap { ring[$0] } }

  public mutating func pop(now: UInt64) -> QueuedJob? {
    while head < ring.count && ring[head] == nil { head += 1 }
    guard let i = firstEligible(), let j = ring[i] else {
      compactIfNeeded()
      return nil
    }
    ring[i] = nil
    if i == head { head += 1 }
    positions[j.id] = nil
    chains.dispatched(j)
    compactIfNeeded()
    return j
  }

  public mutating func remove(id: UInt64) -> QueuedJob? {
    guard let i = positions.removeValue(forKey: id) else { return nil }
    let j = ring[i]
    ring[i] = nil
    compactIfNeeded()
    return j
  }

  public mutating func complete(_ job: QueuedJob, actualCost: UInt64, now: UInt64) {}

  /// Drops consumed and removed entries once they dominate the array, keeping memory O(waiting jobs).
  private mutating func compactIfNeeded() {
    if positions.isEmpty {
      ring.removeAll(keepingCapacity: true)
      head = 0
      return
    }
    guard head > 64 && head * 2 > ring.count else { return }
    ring.removeFirst(head)
    head = 0
    for (i, j) in ring.enumerated() { if let j { positions[j.id] = i } }
  }
}
