import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelScheduler
import CAccelABI
import Foundation
import Testing

/// Crypto jobs and chains through the real rings, and the zeroing of secrets afterwards.
@Suite(.timeLimit(.minutes(2))) struct CryptoJobTests {
  let rig = try! DispatcherTests.Rig(capMBps: nil, pool: 8 << 20)

  func key(_ n: Int = 32) -> SecretBytes { SecretBytes((0..<n).map { UInt8($0 &* 7 &+ 1) }) }

  @Test func chainCompressEncryptThenDecryptDecompressRoundTrips() async throws {
    defer { rig.stop() }
    let text = Data(String(repeating: "chained jobs never leave the device ", count: 2000).utf8)
    let nonce = [UInt8](repeating: 9, count: 12)
    let aux = AEADParameters.encode(nonce: nonce, aad: Array("aad".utf8))
    let bound = Int(BufferSizing.compressBound(UInt64(text.count)))
    let sealed = try await rig.dispatcher.execute(
      JobRequest(
        steps: [DeviceStep(.compress, .gzip, level: 1), DeviceStep(.encrypt, .aes256GCM)], input: text,
        outputCapacity: bound + 16, tenant: "default", aux: aux, key: key(), midCapacity: bound, sensitive: true))
    #expect(sealed.output.count < text.count / 4, "compressed before encryption")
    let opened = try await rig.dispatcher.execute(
      JobRequest(
        steps: [DeviceStep(.decrypt, .aes256GCM), DeviceStep(.decompress, .gzip)], input: sealed.output,
        outputCapacity: text.count, tenant: "default", aux: aux, key: key(), midCapacity: sealed.output.count - 16,
        sensitive: true))
    #expect(opened.output == text)
    // Tampering anywhere fails the whole chain with AUTH_FAILED and releases nothing.
    var bad = sealed.output
    bad[bad.startIndex + 5] ^= 1
    await #expect(throws: JobError.device(.authFailed)) {
      _ = try await rig.dispatcher.execute(
        JobRequest(
          steps: [DeviceStep(.decrypt, .aes256GCM), DeviceStep(.decompress, .gzip)], input: bad,
          outputCapacity: text.count, tenant: "default", aux: aux, key: key(), midCapacity: bad.count - 16,
          sensitive: true))
    }
  }

  @Test func keySlotsAndBuffersAreZeroedAfterTheJob() async throws {
    defer { rig.stop() }
    let secret = Data(repeating: 0x5A, count: 64 * 1024)
    let aux = AEADParameters.encode(nonce: [UInt8](repeating: 1, count: 12), aad: [UInt8]())
    for _ in 0..<8 {
      _ = try await rig.dispatcher.execute(
        JobRequest(
          steps: [DeviceStep(.encrypt, .chacha20Poly1305)], input: secret, outputCapacity: secret.count + 16,
          tenant: "default", aux: aux, key: key(), sensitive: true))
    }
    // Map the queue afresh, as any observer of the region would, and look for leftovers.
    let region = try QueueRegion.attach(fd: rig.device.exportQueue(0))
    let layout = region.layout
    let slots = UnsafeRawBufferPointer(
      start: region.bytes(at: layout.keySlotOffset), count: Int(layout.keySlotCount) * Int(ACCEL_KEYSLOT_SIZE))
    #expect(slots.allSatisfy { $0 == 0 }, "no key bytes left in any key slot")
    let pool = UnsafeRawBufferPointer(start: region.bytes(at: layout.dataOffset), count: Int(layout.dataSize))
    var run = 0
    var longest = 0
    for b in pool {
      run = b == 0x5A ? run + 1 : 0
      longest = max(longest, run)
    }
    #expect(longest < 64, "no plaintext left in the data pool")
  }

  @Test func digestsMatchKnownValues() async throws {
    defer { rig.stop() }
    func digest(_ alg: DeviceAlgorithm, _ data: String, key: SecretBytes? = nil) async throws -> String {
      let r = try await rig.dispatcher.execute(
        JobRequest(
          steps: [DeviceStep(.digest, alg)], input: Data(data.utf8), outputCapacity: alg.digestLength!,
          tenant: "default", key: key, sensitive: key != nil))
      return r.output.map { String(format: "%02x", $0) }.joined()
    }
    #expect(try await digest(.sha256, "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    #expect(try await digest(.crc32c, "123456789") == "e3069283")
    #expect(try await digest(.crc32, "123456789") == "cbf43926")
    #expect(try await digest(.adler32, "Wikipedia") == "11e60398")
    // RFC 4231 test case 2.
    #expect(
      try await digest(.hmacSHA256, "what do ya want for nothing?", key: SecretBytes(Array("Jefe".utf8)))
        == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    await #expect(throws: JobError.device(.badKey)) { _ = try await digest(.hmacSHA256, "x", key: SecretBytes([UInt8]())) }
  }
}
