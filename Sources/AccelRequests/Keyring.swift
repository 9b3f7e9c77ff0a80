package import AccelABI
internal import Foundation
internal import Synchronization
internal import Yams

/// Named, versioned keys per tenant, from a keyring file kept apart from the
/// main configuration because it holds secrets.
///
/// ```yaml
/// keys:
///   - name: orders
///     tenant: alpha
///     algorithm: aes-256-gcm          # aes-128-gcm | aes-256-gcm | chacha20-poly1305 | hmac-sha256 | hmac-sha512
///     min_decryption_version: 1       # older versions cannot decrypt
///     max_encryptions: 4294967296     # per version (NIST SP 800-38D random-nonce bound); may only be lowered
///     versions:
///       - { version: 1, key: <base64>, disabled: false }
///       - { version: 2, key: <base64> }
/// ```
/// The newest enabled version encrypts; decryption uses the version recorded
/// in the envelope (docs/KEYS.md). Rotation is adding a version and sending
/// SIGHUP. Key bytes live only in `SecretBytes`, zeroed when a reload or
/// shutdown drops them.
package struct KeyringFile: Decodable {
  package struct Key: Decodable {
    package var name: String
    package var tenant: String
    package var algorithm: String
    package var minDecryptionVersion: UInt32?
    package var maxEncryptions: UInt64?
    package var versions: [Version]
    enum CodingKeys: String, CodingKey {
      case name, tenant, algorithm, versions
      case minDecryptionVersion = "min_decryption_version"
      case maxEncryptions = "max_encryptions"
    }
  }
  package struct Version: Decodable {
    package var version: UInt32
    package var key: String
    package var disabled: Bool?
  }
  package var keys: [Key]
}

/// One usable key version.
package struct KeyVersion: Sendable {
  package let version: UInt32
  package let material: SecretBytes
  package let disabled: Bool
}

/// A named key with its versions and policy.
package struct NamedKey: Sendable {
  package let name: String
  package let tenant: String
  package let algorithm: DeviceAlgorithm
  package let minDecryptionVersion: UInt32
  package let maxEncryptions: UInt64
  /// Sorted by version, ascending.
  package let versions: [KeyVersion]

  package var newestEnabled: KeyVersion? { versions.last { !$0.disabled } }
  package func version(_ v: UInt32) -> KeyVersion? { versions.first { $0.version == v } }
}

/// Why a named-key lookup failed. Mapped to gRPC in `StatusMapping`.
package enum KeyError: Error, Equatable {
  case notFound(String)
  case otherTenant(String)
  case noUsableVersion(String)
  case versionRetired(name: String, version: UInt32)
  case versionUnknown(name: String, version: UInt32)
  case exhausted(name: String, version: UInt32)
  case noKeyring
  /// The nonce ledger could not be made durable, so no nonce may be used.
  case ledgerUnavailable(String)
}

package struct Keyring: Sendable {
  package let keys: [String: NamedKey]

  package static let empty = Keyring(keys: [:])

  package static let algorithms: [String: DeviceAlgorithm] = [
    "aes-128-gcm": .aes128GCM, "aes-256-gcm": .aes256GCM, "chacha20-poly1305": .chacha20Poly1305,
    "hmac-sha256": .hmacSHA256, "hmac-sha512": .hmacSHA512,
  ]

  package static let nistNonceLimit: UInt64 = 1 << 32

  package static func load(path: String) throws -> Keyring {
    let text: String
    do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
      throw ConfigurationError("cannot read keyring \(path): \(error.localizedDescription)")
    }
    return try parse(yaml: text, source: path)
  }

  package static func parse(yaml: String, source: String = "keyring") throws -> Keyring {
    let file: KeyringFile
    do { file = try YAMLDecoder().decode(KeyringFile.self, from: yaml) } catch {
      // Never echo the file's text: it holds keys.
      throw ConfigurationError("\(source): \(ConfigErrorText.describe(error, revealValues: false))")
    }
    var keys: [String: NamedKey] = [:]
    for (i, k) in file.keys.enumerated() {
      let at = "\(source): keys[\(i)]"
      guard !k.name.isEmpty, !k.name.contains("/") else { throw ConfigurationError("\(at).name: must be non-empty, no '/'") }
      let id = "\(k.tenant)/\(k.name)"
      guard keys[id] == nil else { throw ConfigurationError("\(at).name: duplicate key \(k.name) for tenant \(k.tenant)") }
      guard let alg = algorithms[k.algorithm.lowercased()] else {
        throw ConfigurationError("\(at).algorithm: one of \(algorithms.keys.sorted().joined(separator: ", "))")
      }
      guard !k.versions.isEmpty else { throw ConfigurationError("\(at).versions: at least one version") }
      var versions: [KeyVersion] = []
      for (j, v) in k.versions.enumerated() {
        guard v.version >= 1 else { throw ConfigurationError("\(at).versions[\(j)].version: must be >= 1") }
        guard !versions.contains(where: { $0.version == v.version }) else {
          throw ConfigurationError("\(at).versions[\(j)].version: duplicate version \(v.version)")
        }
        guard var bytes = Data(base64Encoded: v.key) else {
          throw ConfigurationError("\(at).versions[\(j)].key: not base64")
        }
        defer { bytes.resetBytes(in: 0..<bytes.count) }
        if let need = alg.aeadKeyLength, bytes.count != need {
          throw ConfigurationError("\(at).versions[\(j)].key: \(k.algorithm) needs \(need) bytes, got \(bytes.count)")
        }
        guard !bytes.isEmpty, bytes.count <= CryptoSizing.maxKeyLength else {
          throw ConfigurationError("\(at).versions[\(j)].key: 1...\(CryptoSizing.maxKeyLength) bytes")
        }
        versions.append(KeyVersion(version: v.version, material: SecretBytes(bytes), disabled: v.disabled ?? false))
      }
      versions.sort { $0.version < $1.version }
      let limit = min(k.maxEncryptions ?? nistNonceLimit, nistNonceLimit)
      keys[id] = NamedKey(
        name: k.name, tenant: k.tenant, algorithm: alg, minDecryptionVersion: k.minDecryptionVersion ?? 1,
        maxEncryptions: limit, versions: versions)
    }
    return Keyring(keys: keys)
  }

  /// The key `name` as `tenant` may use it.
  package func lookup(_ name: String, tenant: String) throws(KeyError) -> NamedKey {
    if let k = keys["\(tenant)/\(name)"] { return k }
    if keys.values.contains(where: { $0.name == name }) { throw .otherTenant(name) }
    throw .notFound(name)
  }
}

/// Counts random-nonce encryptions per key version and refuses a version past
/// its budget (NIST SP 800-38D §8.3: at most 2^32 invocations with random IVs).
///
/// Counts survive restarts when a state file is configured: the counter
/// reserves blocks of `blockSize` and writes each block's upper end to the file
/// (written, fsynced, renamed over the old one, directory fsynced) before using
/// it, so after a crash the count resumes at or above where it was — never
/// below. A block that cannot be persisted is not taken: the encryption is
/// refused and the counts stay as they were (issue 17, finding 20). The write
/// happens under the ledger's lock, once per `blockSize` encryptions, so files
/// are never written out of order.
///
/// The count is per gateway: replicas sharing a keyring each count their own
/// encryptions (docs/KEYS.md says how to split a key's budget between them).
package final class NonceLedger: Sendable {
  private struct State {
    var used: [String: UInt64] = [:]
    var reserved: [String: UInt64] = [:]
  }
  private let state: Mutex<State>
  private let path: String?
  package let blockSize: UInt64

  package init(path: String?, blockSize: UInt64 = 1 << 16) throws {
    self.path = path
    self.blockSize = blockSize
    var s = State()
    if let path, FileManager.default.fileExists(atPath: path) {
      let data = try Data(contentsOf: URL(fileURLWithPath: path))
      let marks = try JSONDecoder().decode([String: UInt64].self, from: data)
      s.used = marks
      s.reserved = marks
    }
    state = Mutex(s)
  }

  /// Takes one encryption from the version's budget, or throws `exhausted`
  /// (or `ledgerUnavailable` when the next block cannot be persisted).
  package func take(key: NamedKey, version: UInt32) throws(KeyError) {
    let id = "\(key.tenant)/\(key.name)/\(version)"
    try state.withLock { s throws(KeyError) in
      let used = s.used[id, default: 0]
      guard used < key.maxEncryptions else { throw .exhausted(name: key.name, version: version) }
      if let path, used + 1 > s.reserved[id, default: 0] {
        var marks = s.reserved
        marks[id] = min(used + blockSize, key.maxEncryptions)
        try Self.persist(marks, to: path)
        s.reserved = marks
      }
      s.used[id] = used + 1
    }
  }

  package func used(key: NamedKey, version: UInt32) -> UInt64 {
    state.withLock { $0.used["\(key.tenant)/\(key.name)/\(version)", default: 0] }
  }

  /// Writes the marks durably: a temporary file, fsync, rename over `path`, fsync of the directory.
  package static func persist(_ marks: [String: UInt64], to path: String) throws(KeyError) {
    func fail(_ what: String) -> KeyError { .ledgerUnavailable("nonce state \(path): \(what): \(String(cString: strerror(errno)))") }
    let data: Data
    do { data = try JSONEncoder().encode(marks) } catch { throw .ledgerUnavailable("nonce state: \(error)") }
    let tmp = path + ".tmp"
    let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw fail("open \(tmp)") }
    var written = 0
    let ok = data.withUnsafeBytes { b -> Bool in
      while written < b.count {
        guard let base = b.baseAddress else { return true }
        let n = write(fd, base + written, b.count - written)
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return false }
        written += n
      }
      return fsync(fd) == 0
    }
    let error = fail("write \(tmp)")
    close(fd)
    guard ok else { throw error }
    guard rename(tmp, path) == 0 else { throw fail("rename") }
    let dir = open((path as NSString).deletingLastPathComponent.isEmpty ? "." : (path as NSString).deletingLastPathComponent,
      O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    guard dir >= 0 else { throw fail("open its directory") }
    defer { close(dir) }
    guard fsync(dir) == 0 else { throw fail("fsync its directory") }
  }
}

/// Append-only JSON-lines record of key operations: who, which key and version,
/// what, and the outcome. Never key material.
package final class AuditLog: Sendable {
  private let handle: Mutex<FileHandle?>
  package init(path: String?) throws {
    if let path {
      if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
      let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
      h.seekToEndOfFile()
      handle = Mutex(h)
    } else {
      handle = Mutex(nil)
    }
  }

  package func record(tenant: String, key: String, version: UInt32, operation: String, outcome: String) {
    let entry: [String: String] = [
      "time": ISO8601DateFormatter().string(from: Date()), "tenant": tenant, "key": key, "version": String(version),
      "operation": operation, "outcome": outcome,
    ]
    guard let data = try? JSONSerialization.data(withJSONObject: entry, options: [.sortedKeys]) else { return }
    handle.withLock { h in
      h?.write(data)
      h?.write(Data("\n".utf8))
    }
  }
}

/// The live keyring, swapped on reload.
package final class KeyringDirectory: Sendable {
  private let ring: Mutex<Keyring>
  package let path: String?
  package init(path: String?) throws {
    self.path = path
    ring = Mutex(try path.map { try Keyring.load(path: $0) } ?? .empty)
  }
  package var current: Keyring { ring.withLock { $0 } }
  @discardableResult
  package func reload() throws -> Int {
    guard let path else { return 0 }
    let fresh = try Keyring.load(path: path)
    ring.withLock { $0 = fresh }
    return fresh.keys.count
  }
}
