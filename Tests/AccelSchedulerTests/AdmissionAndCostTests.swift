import AccelScheduler
import Testing

@Suite struct AdmissionTests {
  @Test func queueBoundsRejectWithHintsAndFreeOnLeave() {
    var a = AdmissionControl()
    a.setLimits(TenantLimits(maxQueuedJobs: 2, maxQueuedBytes: 1000, maxPayloadBytes: 800), for: "t", now: 0)
    #expect(a.admit(tenant: "t", bytes: 600, now: 0, drainEstimate: 50_000_000) == nil)
    #expect(a.admit(tenant: "t", bytes: 600, now: 0, drainEstimate: 50_000_000) == .tooManyQueuedBytes(retryAfterNanoseconds: 50_000_000))
    #expect(a.admit(tenant: "t", bytes: 300, now: 0, drainEstimate: 1) == nil)
    #expect(a.admit(tenant: "t", bytes: 1, now: 0, drainEstimate: 1) == .tooManyQueuedJobs(retryAfterNanoseconds: 10_000_000), "hint floor 10 ms")
    #expect(a.admit(tenant: "t", bytes: 801, now: 0, drainEstimate: 1) == .payloadTooLarge(limit: 800))
    a.leave(tenant: "t", bytes: 600)
    #expect(a.queuedJobs("t") == 1 && a.queuedBytes("t") == 300)
    #expect(a.admit(tenant: "t", bytes: 600, now: 0, drainEstimate: 1) == nil)
    // Other tenants are unaffected.
    #expect(a.admit(tenant: "other", bytes: 100, now: 0, drainEstimate: 1) == nil)
  }

  @Test func rateCapFollowsAFakeClock() {
    var a = AdmissionControl()
    a.setLimits(TenantLimits(maxQueuedJobs: 1000, maxPayloadBytes: 1000, maxBytesPerSecond: 10_000), for: "t", now: 0)
    // Burst: one second of rate.
    for _ in 0..<10 {
      #expect(a.admit(tenant: "t", bytes: 1000, now: 0, drainEstimate: 0) == nil)
      a.leave(tenant: "t", bytes: 1000)
    }
    guard case .rateLimited(let wait) = a.admit(tenant: "t", bytes: 1000, now: 0, drainEstimate: 0) else {
      Issue.record("expected a rate limit")
      return
    }
    #expect(wait == 100_000_000, "1000 bytes at 10 kB/s")
    // 100 ms later there is room for exactly one more.
    #expect(a.admit(tenant: "t", bytes: 1000, now: 100_000_000, drainEstimate: 0) == nil)
    #expect(a.admit(tenant: "t", bytes: 1000, now: 100_000_000, drainEstimate: 0) != nil)
  }
}

extension AdmissionTests {
  @Test func aClockReadingFromThePastDoesNotRefillTheBucket() {
    var a = AdmissionControl()
    a.setLimits(TenantLimits(maxQueuedJobs: 1000, maxPayloadBytes: 1000, maxBytesPerSecond: 1000), for: "t", now: 5_000)
    #expect(a.admit(tenant: "t", bytes: 1000, now: 5_000, drainEstimate: 0) == nil)
    // A caller that read its clock just before the previous admission took the lock.
    #expect(a.admit(tenant: "t", bytes: 1000, now: 4_999, drainEstimate: 0) != nil)
    #expect(a.admit(tenant: "t", bytes: 1000, now: 5_000, drainEstimate: 0) != nil)
  }
}

@Suite struct CostModelTests {
  let gzipFast = CostModel.JobClass(operation: 1, algorithm: 3, band: 1)

  @Test func learnsTheEngineRate() {
    var m = CostModel(prior: { _ in 1.0 })
    #expect(m.estimate(gzipFast, bytes: 1_000_000) == 1_002_000)
    for _ in 0..<50 { m.observe(gzipFast, bytes: 1_000_000, engineNanoseconds: 5_002_000) }
    #expect(abs(m.rate(gzipFast) - 5.0) < 0.01)
    // Tiny jobs do not move the estimate.
    m.observe(gzipFast, bytes: 100, engineNanoseconds: 999_999_999)
    #expect(abs(m.rate(gzipFast) - 5.0) < 0.01)
    // Classes are independent.
    #expect(m.rate(.init(operation: 2, algorithm: 3, band: 0)) == 1.0)
  }
}
