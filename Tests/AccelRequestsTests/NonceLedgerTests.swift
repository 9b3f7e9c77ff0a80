import AccelABI
import Foundation
import Testing

@testable import AccelRequests

/// Issue 17, finding 20: the ledger advanced its reservation before the file
/// write, ignored the rename's result and never synced; a failed write then let
/// a whole block of encryptions go uncounted on disk.
@Suite struct NonceLedgerTests {
  static let key = NamedKey(
    name: "orders", tenant: "t", algorithm: .aes256GCM, minDecryptionVersion: 1, maxEncryptions: 1 << 32, versions: [])

  static func directory() throws -> String {
    let d = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
    return d
  }

  static func marks(_ path: String) throws -> [String: UInt64] {
    try JSONDecoder().decode([String: UInt64].self, from: Data(contentsOf: URL(fileURLWithPath: path)))
  }

  @Test func aBlockIsOnDiskBeforeItsFirstEncryption() throws {
    let dir = try Self.directory()
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let path = dir + "/nonces.json"
    let ledger = try NonceLedger(path: path, blockSize: 4)
    for n in 1...5 {
      try ledger.take(key: Self.key, version: 1)
      let onDisk = try Self.marks(path)["t/orders/1", default: 0]
      #expect(onDisk >= UInt64(n), "encryption \(n) used a nonce the file does not cover (\(onDisk))")
    }
    #expect(try Self.marks(path)["t/orders/1"] == 8)
    // A restart resumes at the reservation, above what was used.
    #expect(try NonceLedger(path: path, blockSize: 4).used(key: Self.key, version: 1) == 8)
  }

  @Test func aBlockThatCannotBePersistedIsNotTaken() throws {
    let dir = try Self.directory()
    defer { try? FileManager.default.removeItem(atPath: dir) }
    // The state file's directory is gone: the write fails.
    let path = dir + "/missing/nonces.json"
    let ledger = try NonceLedger(path: path, blockSize: 4)
    #expect(throws: KeyError.self) { try ledger.take(key: Self.key, version: 1) }
    #expect(ledger.used(key: Self.key, version: 1) == 0, "a refused encryption was counted as done")
    // Once the directory is back, the block is persisted and used.
    try FileManager.default.createDirectory(atPath: dir + "/missing", withIntermediateDirectories: true)
    try ledger.take(key: Self.key, version: 1)
    #expect(try Self.marks(path)["t/orders/1"] == 4)
    #expect(ledger.used(key: Self.key, version: 1) == 1)
  }
}
