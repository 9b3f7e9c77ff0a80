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

  public init(id: UInt64, tenant: String, cost: UInt64) {
    self.id = id
    self.tenant = tenant
    self.cost = cost
  }
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
  private var ring: [QueuedJob?] = []
  private var head = 0
  private var positions: [UInt64: Int] = [:]

  public init() {}

  public var count: Int { positions.count }

  public mutating func enqueue(_ job: QueuedJob, now: UInt64) {
    positions[job.id] = ring.count
    ring.append(job)
  }

  public func peek() -> QueuedJob? {
    var i = head
    while i < ring.count {
      if let j = ring[i] { return j }
      i += 1
    }
    return nil
  }

  public mutating func pop(now: UInt64) -> QueuedJob? {
    while head < ring.count {
      let j = ring[head]
      ring[head] = nil
      head += 1
      if let j {
        positions[j.id] = nil
        compactIfNeeded()
        return j
      }
    }
    compactIfNeeded()
    return nil
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
