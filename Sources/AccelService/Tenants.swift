public import AccelScheduler
internal import AccelRequests
internal import CAccelCrypto
internal import Foundation
internal import Synchronization
internal import Yams

/// One tenant as written in the tenants file.
///
/// ```yaml
/// tenants:
///   - id: analytics
///     weight: 4
///     api_key_sha256: [2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824]
///     limits: { max_queued_jobs: 256, max_queued_bytes: 268435456,
///               max_payload_bytes: 4194304, max_bytes_per_second: 0 }
/// ```
/// Keys are stored only as lowercase hex SHA-256 digests. API keys are long
/// random tokens (`accelgate gen-key` makes 32 random bytes), so a plain hash
/// is enough: there is nothing for a slow password hash to protect.
struct TenantEntry: Decodable, Equatable {
  var id: String
  var weight: UInt32?
  var apiKeySHA256: [String]
  var limits: Limits?

  struct Limits: Decodable, Equatable {
    var maxQueuedJobs: Int?
    var maxQueuedBytes: Int?
    var maxPayloadBytes: Int?
    var maxBytesPerSecond: Int?
    var maxOpenStreams: Int?
    enum CodingKeys: String, CodingKey {
      case maxQueuedJobs = "max_queued_jobs"
      case maxQueuedBytes = "max_queued_bytes"
      case maxPayloadBytes = "max_payload_bytes"
      case maxBytesPerSecond = "max_bytes_per_second"
      case maxOpenStreams = "max_open_streams"
    }
  }

  enum CodingKeys: String, CodingKey {
    case id, weight, limits
    case apiKeySHA256 = "api_key_sha256"
  }
}

struct TenantsFile: Decodable {
  var tenants: [TenantEntry]
}

/// A validated set of tenants, indexed by key hash.
public struct TenantTable: Sendable {
  public private(set) var policies: [TenantPolicy]
  private var byKeyHash: [String: Int]
  /// True when no tenants file is configured: every call is the `default` tenant.
  public let isOpen: Bool

  /// The single-tenant default that keeps `make run` working without setup.
  public static func open(limits: TenantLimits) -> TenantTable {
    TenantTable(policies: [TenantPolicy(id: "default", weight: 1, limits: limits)], byKeyHash: [:], isOpen: true)
  }

  private init(policies: [TenantPolicy], byKeyHash: [String: Int], isOpen: Bool) {
    self.policies = policies
    self.byKeyHash = byKeyHash
    self.isOpen = isOpen
  }

  /// Parses and validates a tenants file. Errors name the tenant and field.
  public static func load(path: String, defaultLimits: TenantLimits) throws -> TenantTable {
    let text: String
    do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
      throw ConfigurationError("cannot read tenants file \(path): \(error.localizedDescription)")
    }
    return try parse(yaml: text, defaultLimits: defaultLimits, source: path)
  }

  static func parse(yaml: String, defaultLimits: TenantLimits, source: String = "tenants") throws -> TenantTable {
    let file: TenantsFile
    do { file = try YAMLDecoder().decode(TenantsFile.self, from: yaml) } catch {
      throw ConfigurationError("\(source): \(ConfigErrorText.describe(error, revealValues: false))")
    }
    var policies: [TenantPolicy] = []
    var byKeyHash: [String: Int] = [:]
    for (i, t) in file.tenants.enumerated() {
      let at = "\(source): tenants[\(i)]"
      guard !t.id.isEmpty, t.id.count <= 64, t.id.allSatisfy({ $0.isLetter || $0.isNumber || "-_.".contains($0) })
      else { throw ConfigurationError("\(at).id: must be 1-64 letters, digits, '-', '_' or '.'") }
      guard !policies.contains(where: { $0.id == t.id }) else { throw ConfigurationError("\(at).id: duplicate tenant \(t.id)") }
      let weight = t.weight ?? 1
      guard (1...10_000).contains(weight) else { throw ConfigurationError("\(at).weight: must be 1...10000") }
      guard !t.apiKeySHA256.isEmpty else { throw ConfigurationError("\(at).api_key_sha256: at least one key hash") }
      for (k, h) in t.apiKeySHA256.enumerated() {
        let hash = h.lowercased()
        guard hash.count == 64, hash.allSatisfy({ $0.isHexDigit }) else {
          throw ConfigurationError("\(at).api_key_sha256[\(k)]: not a hex SHA-256 digest (64 hex digits)")
        }
        guard byKeyHash[hash] == nil else {
          throw ConfigurationError("\(at).api_key_sha256[\(k)]: the same key is also given to another tenant")
        }
        byKeyHash[hash] = policies.count
      }
      var limits = defaultLimits
      if let l = t.limits {
        limits.maxQueuedJobs = l.maxQueuedJobs ?? limits.maxQueuedJobs
        limits.maxQueuedBytes = l.maxQueuedBytes ?? limits.maxQueuedBytes
        limits.maxPayloadBytes = l.maxPayloadBytes ?? limits.maxPayloadBytes
        limits.maxOpenStreams = l.maxOpenStreams ?? limits.maxOpenStreams
        if let r = l.maxBytesPerSecond { limits.maxBytesPerSecond = r > 0 ? r : nil }
      }
      guard limits.maxQueuedJobs > 0, limits.maxQueuedBytes > 0, limits.maxPayloadBytes > 0, limits.maxOpenStreams > 0 else {
        throw ConfigurationError("\(at).limits: limits must be positive")
      }
      policies.append(TenantPolicy(id: t.id, weight: weight, limits: limits))
    }
    guard !policies.isEmpty else { throw ConfigurationError("\(source): tenants: at least one tenant") }
    return TenantTable(policies: policies, byKeyHash: byKeyHash, isOpen: false)
  }

  /// The tenant an `authorization` header value belongs to, if any.
  func authenticate(authorization: String?) -> TenantPolicy? {
    if isOpen { return policies.first }
    guard let header = authorization, header.count > 7, header.prefix(7).lowercased() == "bearer " else { return nil }
    let key = header.dropFirst(7).trimmingCharacters(in: .whitespaces)
    guard !key.isEmpty, let index = byKeyHash[KeyHash.hex(of: key)] else { return nil }
    return policies[index]
  }

}

/// SHA-256 of API keys, as lowercase hex.
public enum KeyHash {
  public static func hex(of key: some StringProtocol) -> String {
    var bytes = Array(key.utf8)
    defer { accel_secure_zero(&bytes, bytes.count) }
    var digest = [UInt8](repeating: 0, count: 32)
    _ = accel_sha256(bytes, bytes.count, &digest)
    return digest.map { String(format: "%02x", $0) }.joined()
  }

  /// A new random API key: 32 bytes from OpenSSL's CSPRNG, base64url without padding.
  public static func generateKey() -> String {
    var raw = [UInt8](repeating: 0, count: 32)
    defer { accel_secure_zero(&raw, raw.count) }
    precondition(accel_random_bytes(&raw, raw.count) == 1, "no randomness")
    return Data(raw).base64EncodedString().replacingOccurrences(of: "+", with: "-")
      .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
  }
}

/// The live tenant table, swapped atomically on reload (SIGHUP).
final class TenantDirectory: Sendable {
  private let table: Mutex<TenantTable>
  let path: String?
  let defaultLimits: TenantLimits

  init(path: String?, defaultLimits: TenantLimits) throws {
    self.path = path
    self.defaultLimits = defaultLimits
    let t = try path.map { try TenantTable.load(path: $0, defaultLimits: defaultLimits) } ?? .open(limits: defaultLimits)
    table = Mutex(t)
  }

  var current: TenantTable { table.withLock { $0 } }

  /// Re-reads the file. On error the old table stays in force and the error is thrown.
  @discardableResult
  func reload() throws -> TenantTable {
    guard let path else { return current }
    let fresh = try TenantTable.load(path: path, defaultLimits: defaultLimits)
    table.withLock { $0 = fresh }
    return fresh
  }

  func authenticate(authorization: String?) -> TenantPolicy? {
    table.withLock { $0.authenticate(authorization: authorization) }
  }
}
