/// Weighted fair queuing by device time: start-time fair queuing (SFQ) with
/// lazy tags, online charge correction and bounded idle credit.
///
/// Every tenant has a virtual finish time `finish`. The head job of a
/// backlogged tenant starts at `max(finish, V - credit)` where `V` is the
/// scheduler's virtual time; the job with the smallest start tag goes next and
/// advances its tenant's finish by `cost / weight`. `V` follows the start tag of
/// the last dispatched job, so a tenant that was idle re-enters at (almost) the
/// current virtual time: it cannot bank service while idle beyond `idleCredit`.
///
/// Costs are estimates (nanoseconds of device time). When a job completes the
/// dispatcher reports its real device time and the tenant's finish moves by the
/// difference, so systematic misestimates are corrected on the next decision.
///
/// Pure logic: no clocks, no I/O, deterministic tie-breaking by tenant order.
public struct FairScheduler: JobScheduler {
  public struct Configuration: Sendable, Equatable {
    /// Virtual-time credit (ns of weighted device time) a returning tenant may claim.
    public var idleCredit: UInt64
    /// Weight for tenants the scheduler has not been told about.
    public var defaultWeight: UInt32

    public init(idleCredit: UInt64 = 0, defaultWeight: UInt32 = 1) {
      self.idleCredit = idleCredit
      self.defaultWeight = defaultWeight
    }

    public static var defaults: Self { Self() }
  }

  private struct Tenant {
    var weight: Double
    var finish: Double = 0
    var jobs: [QueuedJob] = []
    var head = 0
    /// Order of first appearance, for deterministic ties.
    var rank: Int

    var isBacklogged: Bool { head < jobs.count }

    mutating func compact() {
      if head > 32 && head * 2 > jobs.count {
        jobs.removeFirst(head)
        head = 0
      }
    }
  }

  public let configuration: Configuration
  public var chains = JobChains()
  private var tenants: [String: Tenant] = [:]
  private var order: [String] = []
  private var jobTenant: [UInt64: String] = [:]
  private var virtualTime: Double = 0

  public init(configuration: Configuration = .defaults, weights: [String: UInt32] = [:]) {
    self.configuration = configuration
    for (name, w) in weights.sorted(by: { $0.key < $1.key }) { setWeight(w, for: name) }
  }

  public var count: Int { jobTenant.count }

  /// Sets or changes a tenant's weight (e.g. on configuration reload). Weight 0 is treated as 1.
  public mutating func setWeight(_ weight: UInt32, for tenant: String) {
    let w = Double(max(1, weight))
    if tenants[tenant] == nil {
      tenants[tenant] = Tenant(weight: w, rank: order.count)
      order.append(tenant)
    } else {
      tenants[tenant]!.weight = w
    }
  }

  public func weight(of tenant: String) -> UInt32? { tenants[tenant].map { UInt32($0.weight) } }

  public mutating func enqueue(_ job: QueuedJob, now: UInt64) {
    if tenants[job.tenant] == nil { setWeight(configuration.defaultWeight, for: job.tenant) }
    tenants[job.tenant]!.jobs.append(job)
    jobTenant[job.id] = job.tenant
  }

  /// Start tag a tenant's head job would get now.
  private func startTag(_ t: Tenant) -> Double {
    max(t.finish, virtualTime - Double(configuration.idleCredit))
  }

  /// A tenant's oldest job that may run now: its head, unless that is a chained
  /// job waiting for its turn (then the next one that is not).
  private func firstEligible(_ t: Tenant) -> Int? {
    var i = t.head
    while i < t.jobs.count {
      if chains.isEligible(t.jobs[i]) { return i }
      i += 1
    }
    return nil
  }

  /// The tenant with the smallest start tag among those with an eligible job, and that job's index.
  private func nextTenant() -> (name: String, index: Int)? {
    var best: (name: String, start: Double, rank: Int, index: Int)?
    for name in order {
      guard let t = tenants[name], t.isBacklogged, let i = firstEligible(t) else { continue }
      let s = startTag(t)
      if best == nil || s < best!.start || (s == best!.start && t.rank < best!.rank) { best = (name, s, t.rank, i) }
    }
    return best.map { ($0.name, $0.index) }
  }

  public func peek() -> QueuedJob? {
    guard let (name, i) = nextTenant(), let t = tenants[name] else { return nil }
    return t.jobs[i]
  }

  public mutating func pop(now: UInt64) -> QueuedJob? {
    guard let (name, i) = nextTenant(), var t = tenants[name] else { return nil }
    let job = t.jobs[i]
    if i == t.head { t.head += 1 } else { t.jobs.remove(at: i) }
    chains.dispatched(job)
    let start = startTag(t)
    t.finish = start + Double(job.cost) / t.weight
    virtualTime = max(virtualTime, start)
    t.compact()
    tenants[name] = t
    jobTenant[job.id] = nil
    return job
  }

  public mutating func remove(id: UInt64) -> QueuedJob? {
    guard let name = jobTenant.removeValue(forKey: id), var t = tenants[name] else { return nil }
    guard let i = t.jobs[t.head...].firstIndex(where: { $0.id == id }) else { return nil }
    let job = t.jobs.remove(at: i)
    tenants[name] = t
    return job
  }

  public mutating func complete(_ job: QueuedJob, actualCost: UInt64, now: UInt64) {
    guard var t = tenants[job.tenant] else { return }
    // Charge correction: move the tenant's finish by (actual - estimate) / weight,
    // but never below the virtual time a fresh job would start at.
    let delta = (Double(actualCost) - Double(job.cost)) / t.weight
    t.finish = max(t.finish + delta, min(t.finish, virtualTime))
    tenants[job.tenant] = t
  }

  /// Jobs waiting for one tenant.
  public func queued(for tenant: String) -> Int {
    guard let t = tenants[tenant] else { return 0 }
    return t.jobs.count - t.head
  }
}
