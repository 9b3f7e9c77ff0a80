import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelProto
import AccelMessages
import ArgumentParser
import CAccelEngines
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Synchronization

/// `accelbench`: measures the same gzip jobs at three layers — the raw engine
/// in-process, the device rings (dispatcher → driver → device, no gRPC), and
/// end-to-end over gRPC — and writes JSON for scripts/bench.sh.
@main
struct AccelBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "accelbench", abstract: "AccelGate benchmarks.",
    subcommands: [CompressLayers.self, Fairness.self, Isolation.self, IsolationInProcess.self, CryptoBench.self, DoorbellBench.self], defaultSubcommand: CompressLayers.self)
}

struct CompressLayers: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "layers", abstract: "gzip jobs through the engine, the rings and gRPC.")

  @Option(help: "gRPC target host:port of a running server.") var target = "127.0.0.1:50051"
  @Option(help: "Seconds per measurement.") var seconds: Double = 3
  @Option(help: "Payload sizes in bytes.") var sizes: [Int] = [64 << 10, 1 << 20]
  @Option(help: "Concurrent gRPC callers.") var concurrency: [Int] = [1, 4, 16]
  @Option(help: "Compression level.") var level: Int = 1
  @Option(help: "Where to write the JSON results.") var json = ".build-bench/compress.json"

  func run() async throws {
    var results: [BenchResult] = []
    for size in sizes {
      let payload = Corpus.logLike(bytes: size)
      results.append(try engine(payload))
      report(results.last!)
      for c in [1, 4] {
        results.append(try await rings(payload, concurrency: c))
        report(results.last!)
      }
      for c in concurrency {
        results.append(try await grpc(payload, concurrency: c))
        report(results.last!)
      }
    }
    try FileManager.default.createDirectory(
      at: URL(fileURLWithPath: json).deletingLastPathComponent(), withIntermediateDirectories: true)
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    try encoder.encode(results).write(to: URL(fileURLWithPath: json))
  }

  func report(_ r: BenchResult) {
    print(
      String(
        format: "%-8@ %8d B  c=%-3d %8.1f MB/s %9.0f ops/s  p50 %8.1f us  p99 %8.1f us", r.layer, r.payloadBytes,
        r.concurrency, r.megabytesPerSecond, r.opsPerSecond, r.p50Microseconds, r.p99Microseconds))
  }

  /// The engine called directly, on this thread, with no device in between.
  func engine(_ payload: Data) throws -> BenchResult {
    let ctx = accel_engine_create()!
    defer { accel_engine_destroy(ctx) }
    let cap = Int(BufferSizing.compressBound(UInt64(payload.count)))
    let out = UnsafeMutablePointer<UInt8>.allocate(capacity: cap)
    defer { out.deallocate() }
    var latencies: [UInt64] = []
    let end = SharedMemory.nowNanoseconds() + UInt64(seconds * 1e9)
    var produced: UInt32 = 0
    var consumed: UInt32 = 0
    try payload.withUnsafeBytes { (src: UnsafeRawBufferPointer) in
      let p = src.bindMemory(to: UInt8.self).baseAddress!
      while SharedMemory.nowNanoseconds() < end {
        let t0 = SharedMemory.nowNanoseconds()
        let st = accel_engine_compress(
          ctx, DeviceAlgorithm.gzip.rawValue, UInt8(level), p, UInt32(payload.count), out, UInt32(cap), &produced,
          &consumed)
        guard st == 0 else { throw ValidationError("engine failed: \(st)") }
        latencies.append(SharedMemory.nowNanoseconds() - t0)
      }
    }
    return BenchResult(
      layer: "engine", payloadBytes: payload.count, concurrency: 1, latenciesNs: latencies, seconds: seconds,
      ratio: Double(payload.count) / Double(produced))
  }

  /// Dispatcher → driver → shared-memory rings → emulated device, in this process, no gRPC.
  func rings(_ payload: Data, concurrency: Int) async throws -> BenchResult {
    let device = try EmulatedDevice(configuration: .defaults)
    device.start()
    defer { device.stop() }
    let driver = try DeviceDriver(queueFileDescriptors: (0..<device.queues.count).map { device.exportQueue($0) })
    let dispatcher = Dispatcher(driver: driver)
    dispatcher.start()
    defer {
      dispatcher.shutdown()
      driver.stop()
    }
    let cap = Int(BufferSizing.compressBound(UInt64(payload.count)))
    let level = UInt8(level)
    let latencies = try await runConcurrent(concurrency) {
      _ = try await dispatcher.execute(
        JobRequest(opcode: .compress, algorithm: .gzip, level: level, input: payload, outputCapacity: cap))
    }
    return BenchResult(
      layer: "rings", payloadBytes: payload.count, concurrency: concurrency, latenciesNs: latencies, seconds: seconds)
  }

  /// End-to-end over gRPC against a running server.
  func grpc(_ payload: Data, concurrency: Int) async throws -> BenchResult {
    let level = Int32(level)
    let latencies = try await withAcceleratorClient(target: target) { stub in
      let options = CallOptions.defaults.with { $0.maxResponseMessageBytes = 16 << 20 }
      let request = Accelgate_V1_CompressRequest.with {
        $0.format = .gzip
        $0.level = level
        $0.data = payload
      }
      return try await runConcurrent(concurrency) {
        _ = try await stub.compress(request, options: options)
      }
    }
    return BenchResult(
      layer: "grpc", payloadBytes: payload.count, concurrency: concurrency, latenciesNs: latencies, seconds: seconds)
  }

  func runConcurrent(_ n: Int, _ body: @escaping @Sendable () async throws -> Void) async throws -> [UInt64] {
    try await Self.runConcurrent(n, seconds: seconds, body)
  }

  /// Runs `body` in `n` closed loops for `seconds` and returns every call's latency.
  static func runConcurrent(_ n: Int, seconds: Double, _ body: @escaping @Sendable () async throws -> Void) async throws
    -> [UInt64]
  {
    let end = SharedMemory.nowNanoseconds() + UInt64(seconds * 1e9)
    return try await withThrowingTaskGroup(of: [UInt64].self) { group in
      for _ in 0..<n {
        group.addTask {
          var l: [UInt64] = []
          while SharedMemory.nowNanoseconds() < end {
            let t0 = SharedMemory.nowNanoseconds()
            try await body()
            l.append(SharedMemory.nowNanoseconds() - t0)
          }
          return l
        }
      }
      var all: [UInt64] = []
      for try await l in group { all += l }
      return all
    }
  }
}

extension CallOptions {
  func with(_ change: (inout Self) -> Void) -> Self {
    var c = self
    change(&c)
    return c
  }
}

struct BenchResult: Codable {
  var layer: String
  var payloadBytes: Int
  var concurrency: Int
  var operations: Int
  var megabytesPerSecond: Double
  var opsPerSecond: Double
  var p50Microseconds: Double
  var p99Microseconds: Double
  var compressionRatio: Double?

  init(layer: String, payloadBytes: Int, concurrency: Int, latenciesNs: [UInt64], seconds: Double, ratio: Double? = nil) {
    let sorted = latenciesNs.sorted()
    func pct(_ p: Double) -> Double {
      sorted.isEmpty ? 0 : Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1000
    }
    self.layer = layer
    self.payloadBytes = payloadBytes
    self.concurrency = concurrency
    self.operations = sorted.count
    self.opsPerSecond = Double(sorted.count) / seconds
    self.megabytesPerSecond = opsPerSecond * Double(payloadBytes) / 1e6
    self.p50Microseconds = pct(0.50)
    self.p99Microseconds = pct(0.99)
    self.compressionRatio = ratio
  }
}

/// Deterministic, log-like text: compressible about as much as real service logs.
enum Corpus {
  static func logLike(bytes: Int) -> Data {
    var rng: UInt64 = 0x1234_5678_9abc_def0
    func next() -> UInt64 {
      rng ^= rng << 13
      rng ^= rng >> 7
      rng ^= rng << 17
      return rng
    }
    let levels = ["INFO", "WARN", "DEBUG", "ERROR"]
    let words = ["request", "completed", "tenant", "queue", "device", "latency", "bytes", "session", "upstream", "cache"]
    var out = Data(capacity: bytes + 200)
    while out.count < bytes {
      let line =
        "2026-11-26T12:\(next() % 60):\(next() % 60).\(next() % 1000)Z \(levels[Int(next() % 4)]) \(words[Int(next() % 10)]) id=\(next() % 100000) \(words[Int(next() % 10)])=\(next() % 5000) took=\(next() % 900)us\n"
      out.append(contentsOf: line.utf8)
    }
    return out.prefix(bytes)
  }
}
