/// Per-tenant bounds, from the tenants file.
public struct TenantLimits: Sendable, Equatable, Codable {
  /// Jobs that may wait in the scheduler at once.
  public var maxQueuedJobs: Int
  /// Payload bytes that may wait in the scheduler at once.
  public var maxQueuedBytes: Int
  /// Largest single payload.
  public var maxPayloadBytes: Int
  /// Sustained admission rate cap in bytes per second; nil means none.
  public var maxBytesPerSecond: Int?
  /// Compression streams the tenant may hold open at once (each holds a device
  /// stream context, of which a queue has a few dozen).
  public var maxOpenStreams: Int

  public init(
    maxQueuedJobs: Int = 256, maxQueuedBytes: Int = 256 << 20, maxPayloadBytes: Int = 4 << 20,
    maxBytesPerSecond: Int? = nil, maxOpenStreams: Int = 16
  ) {
    self.maxQueuedJobs = maxQueuedJobs
    self.maxQueuedBytes = maxQueuedBytes
    self.maxPayloadBytes = maxPayloadBytes
    self.maxBytesPerSecond = maxBytesPerSecond
    self.maxOpenStreams = maxOpenStreams
  }

  public static var defaults: Self { Self() }
}

/// Why admission refused a job.
public enum AdmissionRefusal: Sendable, Equatable {
  /// The tenant already has `maxQueuedJobs` waiting.
  case tooManyQueuedJobs(retryAfterNanoseconds: UInt64)
  /// The tenant already has `maxQueuedBytes` waiting.
  case tooManyQueuedBytes(retryAfterNanoseconds: UInt64)
  /// The tenant is over its byte rate.
  case rateLimited(retryAfterNanoseconds: UInt64)
  /// The payload is over the tenant's single-payload limit (retrying cannot help).
  case payloadTooLarge(limit: Int)

  public var reason: String {
    switch self {
    case .tooManyQueuedJobs: "queue_full"
    case .tooManyQueuedBytes: "queued_bytes"
    case .rateLimited: "rate_limited"
    case .payloadTooLarge: "payload_too_large"
    }
  }
}

/// Per-tenant admission: bounded queues and an optional token-bucket rate cap.
///
/// Pure logic: time comes in as `now` (ns on any monotonic clock), so tests
/// drive it with a fake clock.
public struct AdmissionControl: Sendable {
  private struct Account {
    var limits: TenantLimits
    var queuedJobs = 0
    var queuedBytes = 0
    /// Token bucket, in bytes.
    var tokens: Double
    var refilledAt: UInt64
  }

  private var accounts: [String: Account] = [:]
  public var defaultLimits: TenantLimits

  public init(defaultLimits: TenantLimits = .defaults) { self.defaultLimits = defaultLimits }

  /// Sets a tenant's limits (on configuration load or reload). Queued counts are kept.
  public mutating func setLimits(_ limits: TenantLimits, for tenant: String, now: UInt64) {
    if accounts[tenant] == nil {
      accounts[tenant] = Account(limits: limits, tokens: Self.burst(limits), refilledAt: now)
    } else {
      accounts[tenant]!.limits = limits
      accounts[tenant]!.tokens = min(accounts[tenant]!.tokens, Self.burst(limits))
    }
  }

  public func limits(for tenant: String) -> TenantLimits { accounts[tenant]?.limits ?? defaultLimits }

  /// The bucket holds one second of rate, and always at least one maximum payload,
  /// so a single largest job is never refused forever.
  private static func burst(_ l: TenantLimits) -> Double {
    guard let rate = l.maxBytesPerSecond else { return .infinity }
    return Double(max(rate, l.maxPayloadBytes))
  }

  /// Admits a job of `bytes` or says why not. `drainEstimate` is the expected time
  /// for the tenant's queue to move, used for the retry hint.
  public mutating func admit(tenant: String, bytes: Int, now: UInt64, drainEstimate: UInt64) -> AdmissionRefusal? {
    if accounts[tenant] == nil { setLimits(defaultLimits, for: tenant, now: now) }
    var a = accounts[tenant]!
    defer { accounts[tenant] = a }
    guard bytes <= a.limits.maxPayloadBytes else { return .payloadTooLarge(limit: a.limits.maxPayloadBytes) }
    let hint = min(max(drainEstimate, 10_000_000), 5_000_000_000)
    guard a.queuedJobs < a.limits.maxQueuedJobs else { return .tooManyQueuedJobs(retryAfterNanoseconds: hint) }
    guard a.queuedBytes + bytes <= a.limits.maxQueuedBytes || a.queuedJobs == 0 else {
      return .tooManyQueuedBytes(retryAfterNanoseconds: hint)
    }
    if let rate = a.limits.maxBytesPerSecond, rate > 0 {
      // Callers may read their clock before taking the lock that serialises
      // admissions, so `now` can be slightly behind the last refill: never
      // let time run backwards (an unsigned wrap would refill the bucket).
      let elapsed = now > a.refilledAt ? Double(now - a.refilledAt) / 1e9 : 0
      a.tokens = min(Self.burst(a.limits), a.tokens + elapsed * Double(rate))
      a.refilledAt = max(a.refilledAt, now)
      guard a.tokens >= Double(bytes) else {
        let wait = (Double(bytes) - a.tokens) / Double(rate)
        return .rateLimited(retryAfterNanoseconds: UInt64(wait * 1e9))
      }
      a.tokens -= Double(bytes)
    }
    a.queuedJobs += 1
    a.queuedBytes += bytes
    return nil
  }

  /// A job that was already admitted comes back to wait (a retry after a queue
  /// error): counted again, without limits or rate checks, since it was admitted once.
  public mutating func reenter(tenant: String, bytes: Int) {
    guard var a = accounts[tenant] else { return }
    a.queuedJobs += 1
    a.queuedBytes += bytes
    accounts[tenant] = a
  }

  /// A job left the queue (dispatched, cancelled or expired).
  public mutating func leave(tenant: String, bytes: Int) {
    guard var a = accounts[tenant] else { return }
    a.queuedJobs = max(0, a.queuedJobs - 1)
    a.queuedBytes = max(0, a.queuedBytes - bytes)
    accounts[tenant] = a
  }

  public func queuedJobs(_ tenant: String) -> Int { accounts[tenant]?.queuedJobs ?? 0 }
  public func queuedBytes(_ tenant: String) -> Int { accounts[tenant]?.queuedBytes ?? 0 }

  /// True when the tenant could queue one more job of `bytes` right now (ignoring the rate cap).
  public func hasRoom(tenant: String, bytes: Int = 0) -> Bool {
    guard let a = accounts[tenant] else { return true }
    return a.queuedJobs < a.limits.maxQueuedJobs && (a.queuedJobs == 0 || a.queuedBytes + bytes <= a.limits.maxQueuedBytes)
  }
}
