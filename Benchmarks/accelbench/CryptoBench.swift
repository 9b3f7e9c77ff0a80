import AccelABI
import AccelProto
import AccelMessages
import ArgumentParser
import CAccelABI
import CAccelEngines
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf

/// AES-256-GCM and SHA-256 through raw OpenSSL in-process and through the service.
struct CryptoBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "crypto", abstract: "AES-256-GCM and SHA-256: raw OpenSSL vs the service.")
  @Option var target = "127.0.0.1:50051"
  @Option var seconds: Double = 3
  @Option var concurrency = 4
  @Option var json = ".build-bench/crypto.json"

  func run() async throws {
    var results: [BenchResult] = []
    for size in [4096, 1 << 20] {
      let payload = Data((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) })
      for op in ["aes-256-gcm", "sha-256"] {
        var r = try raw(op, payload)
        r.layer = "openssl \(op)"
        results.append(r)
        var g = try await service(op, payload)
        g.layer = "service \(op)"
        results.append(g)
        for x in [r, g] {
          print(
            String(
              format: "%-22@ %8d B c=%-2d %9.1f MB/s %9.0f ops/s p50 %8.1f us p99 %8.1f us", x.layer, x.payloadBytes,
              x.concurrency, x.megabytesPerSecond, x.opsPerSecond, x.p50Microseconds, x.p99Microseconds))
        }
      }
    }
    try write(results, to: json)
  }

  /// The engine functions the device runs, called directly on one thread.
  func raw(_ op: String, _ payload: Data) throws -> BenchResult {
    let ctx = accel_engine_create()!
    defer { accel_engine_destroy(ctx) }
    let key = [UInt8](repeating: 7, count: 32)
    let params = AEADParameters.encode(nonce: [UInt8](repeating: 1, count: 12), aad: [UInt8]())
    var out = [UInt8](repeating: 0, count: payload.count + 64)
    var latencies: [UInt64] = []
    let end = SharedMemory.nowNanoseconds() + UInt64(seconds * 1e9)
    try payload.withUnsafeBytes { src in
      let p = src.bindMemory(to: UInt8.self).baseAddress!
      while SharedMemory.nowNanoseconds() < end {
        var produced: UInt32 = 0
        let t0 = SharedMemory.nowNanoseconds()
        let st =
          op == "sha-256"
          ? accel_engine_digest(
            ctx, DeviceAlgorithm.sha256.rawValue, nil, 0, p, UInt32(payload.count), &out, UInt32(out.count), &produced)
          : params.withUnsafeBytes { pb in
            accel_engine_aead(
              ctx, 1, DeviceAlgorithm.aes256GCM.rawValue, key, 32, pb.baseAddress!.assumingMemoryBound(to: accel_aead_params.self),
              nil, p, UInt32(payload.count), &out, UInt32(out.count), &produced)
          }
        guard st == 0 else { throw ValidationError("engine failed \(st)") }
        latencies.append(SharedMemory.nowNanoseconds() - t0)
      }
    }
    return BenchResult(layer: op, payloadBytes: payload.count, concurrency: 1, latenciesNs: latencies, seconds: seconds)
  }

  func service(_ op: String, _ payload: Data) async throws -> BenchResult {
    let latencies = try await withAcceleratorClient(target: target) { stub in
      let key = Data(repeating: 7, count: 32)
      return try await CompressLayers.runConcurrent(concurrency, seconds: seconds) {
        if op == "sha-256" {
          _ = try await stub.digest(.with { $0.algorithm = .sha256; $0.data = payload })
        } else {
          _ = try await stub.encrypt(
            .with {
              $0.algorithm = .aes256Gcm
              $0.key = .with { $0.raw = key }
              $0.plaintext = payload
            })
        }
      }
    }
    return BenchResult(
      layer: op, payloadBytes: payload.count, concurrency: concurrency, latenciesNs: latencies, seconds: seconds)
  }
}
