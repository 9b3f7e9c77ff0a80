import AccelScheduler
import Foundation
@testable import AccelService
import Testing

@Suite struct TenantsFileTests {
  let alphaHash = KeyHash.hex(of: "alpha-key")

  @Test func parsesTenantsAndAuthenticatesByKeyHash() throws {
    let yaml = """
      tenants:
        - id: alpha
          weight: 4
          api_key_sha256: [\(alphaHash)]
          limits: { max_queued_jobs: 9, max_bytes_per_second: 1000 }
        - id: beta
          api_key_sha256: [\(KeyHash.hex(of: "beta-key").uppercased())]
      """
    let t = try TenantTable.parse(yaml: yaml, defaultLimits: TenantLimits(maxQueuedJobs: 5))
    #expect(t.policies.map(\.id) == ["alpha", "beta"])
    #expect(t.policies[0].weight == 4 && t.policies[1].weight == 1)
    #expect(t.policies[0].limits.maxQueuedJobs == 9 && t.policies[0].limits.maxBytesPerSecond == 1000)
    #expect(t.policies[1].limits.maxQueuedJobs == 5, "defaults fill what a tenant leaves out")
    #expect(t.authenticate(authorization: "Bearer alpha-key")?.id == "alpha")
    #expect(t.authenticate(authorization: "bearer beta-key")?.id == "beta", "scheme is case-insensitive; hashes too")
    #expect(t.authenticate(authorization: "Bearer nope") == nil)
    #expect(t.authenticate(authorization: "alpha-key") == nil)
    #expect(t.authenticate(authorization: nil) == nil)
  }

  @Test(arguments: [
    ("tenants: []", "at least one tenant"),
    ("tenants:\n  - id: a\n    api_key_sha256: [abc]", "tenants[0].api_key_sha256[0]"),
    ("tenants:\n  - id: a\n    weight: 0\n    api_key_sha256: [KEY]", "tenants[0].weight"),
    ("tenants:\n  - id: 'a b'\n    api_key_sha256: [KEY]", "tenants[0].id"),
    ("tenants:\n  - id: a\n    api_key_sha256: [KEY]\n  - id: a\n    api_key_sha256: [OTHER]", "duplicate tenant"),
    ("tenants:\n  - id: a\n    api_key_sha256: [KEY]\n  - id: b\n    api_key_sha256: [KEY]", "another tenant"),
    ("tenants:\n  - id: a\n    weight: many\n    api_key_sha256: [KEY]", "tenants[0].weight"),
    ("tenants:\n  - weight: 1\n    api_key_sha256: [KEY]", "tenants[0].id"),
  ])
  func badFilesNameTheField(yaml: String, expected: String) {
    let text = yaml.replacingOccurrences(of: "OTHER", with: KeyHash.hex(of: "other"))
      .replacingOccurrences(of: "KEY", with: alphaHash)
    do {
      _ = try TenantTable.parse(yaml: text, defaultLimits: .defaults)
      Issue.record("accepted: \(yaml)")
    } catch {
      #expect("\(error)".contains(expected), "\(error)")
    }
  }

  @Test func openModeIsOneDefaultTenant() {
    let t = TenantTable.open(limits: .defaults)
    #expect(t.authenticate(authorization: nil)?.id == "default")
    #expect(t.authenticate(authorization: "Bearer anything")?.id == "default")
  }

  @Test func keyHashIsSHA256() {
    #expect(KeyHash.hex(of: "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    let k = KeyHash.generateKey()
    #expect(k.count == 43 && k != KeyHash.generateKey())
  }
}
