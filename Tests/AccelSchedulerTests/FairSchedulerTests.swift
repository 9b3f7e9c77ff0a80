import AccelScheduler
import Testing

/// A fake device for the scheduler: `servers` engines, a virtual clock, and
/// jobs whose real device time may differ from the estimate the scheduler saw.
struct Simulation {
  var scheduler: FairScheduler
  var clock: UInt64 = 0
  var servers: Int
  /// (finish time, job, actual cost)
  var running: [(UInt64, QueuedJob, UInt64)] = []
  var deviceTime: [String: UInt64] = [:]
  var dispatched: [String] = []
  var nextID: UInt64 = 0

  init(weights: [String: UInt32], servers: Int = 1, idleCredit: UInt64 = 0) {
    scheduler = FairScheduler(configuration: .init(idleCredit: idleCredit), weights: weights)
    self.servers = servers
  }

  mutating func submit(_ tenant: String, estimate: UInt64) {
    scheduler.enqueue(QueuedJob(id: nextID, tenant: tenant, cost: estimate), now: clock)
    nextID += 1
  }

  /// Runs until `until`, keeping each tenant in `backlog` saturated with jobs from `jobs`.
  mutating func run(
    until: UInt64, backlog: [String] = [], jobs: (String, UInt64) -> (estimate: UInt64, actual: UInt64)
  ) {
    var actualByID: [UInt64: UInt64] = [:]
    var n: UInt64 = 0
    func refill(_ sim: inout Simulation) {
      for t in backlog where sim.scheduler.queued(for: t) < 4 {
        while sim.scheduler.queued(for: t) < 4 {
          let j = jobs(t, n)
          n += 1
          actualByID[sim.nextID] = j.actual
          sim.submit(t, estimate: j.estimate)
        }
      }
    }
    while clock < until {
      refill(&self)
      while running.count < servers, let job = scheduler.pop(now: clock) {
        let actual = actualByID[job.id] ?? job.cost
        running.append((clock + actual, job, actual))
        dispatched.append(job.tenant)
      }
      guard let soonest = running.min(by: { $0.0 < $1.0 }) else { break }
      clock = soonest.0
      running.removeAll { $0.1.id == soonest.1.id }
      deviceTime[soonest.1.tenant, default: 0] += soonest.2
      scheduler.complete(soonest.1, actualCost: soonest.2, now: clock)
    }
  }

  func share(_ t: String) -> Double {
    Double(deviceTime[t] ?? 0) / Double(deviceTime.values.reduce(0, +))
  }
}

@Suite struct FairSchedulerTests {
  let weights: [String: UInt32] = ["light": 1, "medium": 2, "heavy": 4]

  @Test func equalJobsGetExactSharesForWeights124() {
    var sim = Simulation(weights: weights)
    sim.run(until: 7_000_000, backlog: ["light", "medium", "heavy"]) { _, _ in (1000, 1000) }
    // 7000 equal jobs: exactly 1000 / 2000 / 4000 (± one job at the cut-off).
    #expect(abs(Int(sim.deviceTime["light"]!) - 1_000_000) <= 1000)
    #expect(abs(Int(sim.deviceTime["medium"]!) - 2_000_000) <= 1000)
    #expect(abs(Int(sim.deviceTime["heavy"]!) - 4_000_000) <= 1000)
    // And the interleaving is smooth: in every window of 7 dispatches each tenant gets its weight ±1.
    for start in stride(from: 0, to: sim.dispatched.count - 7, by: 7) {
      let window = sim.dispatched[start..<(start + 7)]
      #expect(abs(window.filter { $0 == "heavy" }.count - 4) <= 1)
    }
  }

  @Test func mixedJobSizesGetDeviceTimeSharesForWeights124() {
    var sim = Simulation(weights: weights, servers: 2)
    // Sizes cycle 4 KiB .. 1 MiB; each tenant gets a different phase of the cycle.
    let sizes: [UInt64] = [4096, 65536, 262_144, 1_048_576, 16384]
    sim.run(until: 2_000_000_000, backlog: ["light", "medium", "heavy"]) { t, n in
      let s = sizes[Int((n + UInt64(t.count)) % UInt64(sizes.count))]
      return (s, s)
    }
    let maxJob = 1_048_576.0
    let total = Double(sim.deviceTime.values.reduce(0, +))
    for (t, w) in weights {
      let expected = total * Double(w) / 7
      // Within two of the largest jobs (non-preemptive service, two servers).
      #expect(abs(Double(sim.deviceTime[t]!) - expected) <= 2 * maxJob, "\(t)")
    }
  }

  @Test func chargeCorrectionFixesWrongEstimates() {
    var sim = Simulation(weights: ["liar": 1, "honest": 1])
    // The liar's jobs are estimated at 1/10 of what they really cost.
    sim.run(until: 100_000_000, backlog: ["liar", "honest"]) { t, _ in
      t == "liar" ? (1000, 10_000) : (10_000, 10_000)
    }
    #expect(abs(sim.share("liar") - 0.5) < 0.02, "share \(sim.share("liar"))")
    // Without correction the liar would get ~10x the honest tenant's device time.
    var uncorrected = FairScheduler(weights: ["liar": 1, "honest": 1])
    var got: [String: Int] = [:]
    for i in 0..<1000 {
      uncorrected.enqueue(QueuedJob(id: UInt64(2 * i), tenant: "liar", cost: 1000), now: 0)
      uncorrected.enqueue(QueuedJob(id: UInt64(2 * i + 1), tenant: "honest", cost: 10_000), now: 0)
    }
    for _ in 0..<550 { got[uncorrected.pop(now: 0)!.tenant, default: 0] += 1 }
    #expect(got["liar"]! > 400, "the simulation above really needed correction")
  }

  @Test func idleTenantCannotBankCredit() {
    var sim = Simulation(weights: ["steady": 1, "sleeper": 1])
    // The sleeper is away while the steady tenant runs alone for a long time...
    sim.run(until: 50_000_000, backlog: ["steady"]) { _, _ in (1000, 1000) }
    #expect(sim.deviceTime["sleeper"] == nil)
    sim.deviceTime = [:]
    sim.dispatched = []
    // ...then both are backlogged: the sleeper gets its half, not a 50 ms catch-up burst.
    sim.run(until: 60_000_000, backlog: ["steady", "sleeper"]) { _, _ in (1000, 1000) }
    #expect(abs(sim.share("sleeper") - 0.5) < 0.01)
    let firstHundred = sim.dispatched.prefix(100)
    #expect(firstHundred.filter { $0 == "sleeper" }.count <= 51)
  }

  @Test func boundedCreditIsHonoured() {
    var sim = Simulation(weights: ["steady": 1, "sleeper": 1], idleCredit: 10_000)
    sim.run(until: 50_000_000, backlog: ["steady"]) { _, _ in (1000, 1000) }
    sim.dispatched = []
    sim.run(until: 50_100_000, backlog: ["steady", "sleeper"]) { _, _ in (1000, 1000) }
    // With 10 µs of credit the sleeper may run ahead by at most ~10 jobs.
    let lead = sim.dispatched.prefix(40).filter { $0 == "sleeper" }.count - 20
    #expect(lead >= 4 && lead <= 11, "lead \(lead)")
  }

  @Test func noTenantStarvesEvenAtWeight1Against1000() {
    var sim = Simulation(weights: ["tiny": 1, "huge": 1000])
    sim.run(until: 20_000_000, backlog: ["tiny", "huge"]) { _, _ in (1000, 1000) }
    // 20 000 jobs: tiny gets ~20 and never waits more than ~1001 dispatches.
    var gap = 0
    var worst = 0
    for t in sim.dispatched {
      if t == "tiny" { gap = 0 } else { gap += 1; worst = max(worst, gap) }
    }
    #expect(sim.dispatched.filter { $0 == "tiny" }.count >= 19)
    #expect(worst <= 1001)
  }

  @Test func removeAndPeekAreConsistent() {
    var s = FairScheduler(weights: ["a": 1, "b": 1])
    s.enqueue(QueuedJob(id: 1, tenant: "a", cost: 10), now: 0)
    s.enqueue(QueuedJob(id: 2, tenant: "b", cost: 10), now: 0)
    s.enqueue(QueuedJob(id: 3, tenant: "a", cost: 10), now: 0)
    #expect(s.remove(id: 1)?.id == 1)
    #expect(s.peek()?.id == 3)
    #expect(s.pop(now: 0)?.id == 3)
    #expect(s.pop(now: 0)?.id == 2)
    #expect(s.pop(now: 0) == nil)
    #expect(s.count == 0)
  }
}
