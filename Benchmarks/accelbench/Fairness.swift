import AccelProto
import AccelMessages
import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Synchronization

/// Closed-loop gRPC callers for one tenant.
struct TenantLoad: Sendable {
  var name: String
  var key: String
  var weight: Double
  var callers: Int
  var sizes: [Int]
}

/// What one run of callers saw, per tenant.
struct TenantOutcome: Codable, Sendable {
  var tenant: String
  var weight: Double
  var jobs: Int
  var deviceNanoseconds: UInt64
  var latenciesMicroseconds: [Double]
  var errors: Int
}

/// Runs every tenant's callers against `target` for `seconds`; counts only jobs
/// that complete inside [warmup, seconds - cooldown] so every tenant is backlogged.
func drive(target: String, loads: [TenantLoad], seconds: Double, warmup: Double, cooldown: Double) async throws
  -> [TenantOutcome]
{
  let payloads = Dictionary(
    uniqueKeysWithValues: Set(loads.flatMap(\.sizes)).map { ($0, Corpus.logLike(bytes: $0)) })
  let start = ContinuousClock.now
  let countFrom = start + .milliseconds(Int64(warmup * 1000))
  let countUntil = start + .milliseconds(Int64((seconds - cooldown) * 1000))
  let stopAt = start + .milliseconds(Int64(seconds * 1000))
  var options = CallOptions.defaults
  options.maxResponseMessageBytes = 16 << 20
  options.timeout = .seconds(60)
  let opts = options
  // Each tenant is its own client with its own connection, as separate tenants
  // would be: one shared HTTP/2 connection would queue the light tenant's frames
  // behind the heavy tenants' megabytes and measure the socket, not the scheduler.
  return try await withThrowingTaskGroup(of: TenantOutcome.self) { tenants in
    for load in loads {
      tenants.addTask {
        try await withAcceleratorClient(target: target) { stub in
          return try await withThrowingTaskGroup(of: TenantOutcome.self) { group in
            for caller in 0..<load.callers {
              group.addTask {
                var md = Metadata()
                md.addString("Bearer \(load.key)", forKey: "authorization")
                var out = TenantOutcome(
                  tenant: load.name, weight: load.weight, jobs: 0, deviceNanoseconds: 0, latenciesMicroseconds: [],
                  errors: 0)
                var i = caller
                while ContinuousClock.now < stopAt {
                  let size = load.sizes[i % load.sizes.count]
                  i += 1
                  let request = Accelgate_V1_CompressRequest.with {
                    $0.format = .gzip
                    $0.level = 1
                    $0.data = payloads[size]!
                  }
                  let t0 = ContinuousClock.now
                  do {
                    let r = try await stub.compress(request, metadata: md, options: opts)
                    let t1 = ContinuousClock.now
                    if t1 >= countFrom && t1 <= countUntil {
                      out.jobs += 1
                      out.deviceNanoseconds += r.stats.deviceNs
                      let d = (t1 - t0).components
                      out.latenciesMicroseconds.append(Double(d.seconds) * 1e6 + Double(d.attoseconds) / 1e12)
                    }
                  } catch {
                    out.errors += 1
                    try await Task.sleep(for: .milliseconds(5))
                  }
                }
                return out
              }
            }
            var merged = TenantOutcome(
              tenant: load.name, weight: load.weight, jobs: 0, deviceNanoseconds: 0, latenciesMicroseconds: [],
              errors: 0)
            for try await o in group {
              merged.jobs += o.jobs
              merged.deviceNanoseconds += o.deviceNanoseconds
              merged.latenciesMicroseconds += o.latenciesMicroseconds
              merged.errors += o.errors
            }
            return merged
          }
        }
      }
    }
    var all: [String: TenantOutcome] = [:]
    for try await o in tenants { all[o.tenant] = o }
    return loads.compactMap { all[$0.name] }
  }
}

/// A client with the HTTP/2 window and frame size the server uses for MiB payloads
/// (the transport's 64 KiB default window caps a MiB call at a few round trips).
func withAcceleratorClient<R: Sendable>(
  target: String, _ body: (Accelgate_V1_Accelerator.Client<HTTP2ClientTransport.Posix>) async throws -> R
) async throws -> R {
  let parts = target.split(separator: ":")
  guard parts.count == 2, let port = Int(parts[1]) else { throw ValidationError("target must be host:port") }
  return try await withGRPCClient(
    transport: .http2NIOPosix(
      target: .ipv4(address: String(parts[0]), port: port), transportSecurity: .plaintext,
      config: .defaults {
        $0.http2.maxFrameSize = 1 << 20
        $0.http2.targetWindowSize = 4 << 20  // see docs/STREAMING.md, "HTTP/2 windows"
      })
  ) { client in try await body(Accelgate_V1_Accelerator.Client(wrapping: client)) }
}

func percentile(_ values: [Double], _ p: Double) -> Double {
  guard !values.isEmpty else { return 0 }
  let s = values.sorted()
  return s[min(s.count - 1, Int(Double(s.count) * p))]
}

struct ShareRow: Codable {
  var tenant: String
  var weight: Double
  var jobs: Int
  var errors: Int
  var deviceShare: Double
  var entitlement: Double
  var relativeError: Double
}

struct FairnessResult: Codable {
  var scheduler: String
  var rows: [ShareRow]
  var jainIndex: Double
  var maxRelativeError: Double
}

/// Weights 1:2:4 saturating the device with mixed 4 KiB–1 MiB jobs.
struct Fairness: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Device-time shares of tenants with weights 1:2:4.")
  @Option var target = "127.0.0.1:50051"
  @Option(help: "Label for the result (the server's scheduler).") var label = "fair"
  @Option(help: "tenant=key=weight, repeated.") var tenant: [String] = []
  @Option var seconds: Double = 12
  @Option var callers = 8
  @Option var json = ".build-bench/fairness.json"

  func run() async throws {
    let sizes = [4096, 1 << 20, 65536, 262_144, 16384, 524_288]
    let loads = try tenant.map { spec -> TenantLoad in
      let p = spec.split(separator: "=")
      guard p.count == 3, let w = Double(p[2]) else { throw ValidationError("tenant is name=key=weight") }
      return TenantLoad(name: String(p[0]), key: String(p[1]), weight: w, callers: callers, sizes: sizes)
    }
    let outcomes = try await drive(target: target, loads: loads, seconds: seconds, warmup: 2, cooldown: 1)
    let total = Double(outcomes.map(\.deviceNanoseconds).reduce(0, +))
    let weightSum = loads.map(\.weight).reduce(0, +)
    let rows = outcomes.map { o -> ShareRow in
      let share = Double(o.deviceNanoseconds) / total
      let entitled = o.weight / weightSum
      return ShareRow(
        tenant: o.tenant, weight: o.weight, jobs: o.jobs, errors: o.errors, deviceShare: share, entitlement: entitled,
        relativeError: (share - entitled) / entitled)
    }
    // Jain's index over weight-normalised shares: 1 is perfectly proportional.
    let x = rows.map { $0.deviceShare / $0.weight }
    let jain = pow(x.reduce(0, +), 2) / (Double(x.count) * x.map { $0 * $0 }.reduce(0, +))
    let result = FairnessResult(
      scheduler: label, rows: rows, jainIndex: jain, maxRelativeError: rows.map { abs($0.relativeError) }.max() ?? 0)
    for r in rows {
      print(
        String(
          format: "%@ %-8@ w=%.0f jobs=%5d share %5.1f%% (entitled %5.1f%%, rel. error %+5.1f%%)", label, r.tenant,
          r.weight, r.jobs, r.deviceShare * 100, r.entitlement * 100, r.relativeError * 100))
    }
    print(String(format: "%@ Jain index %.4f", label, jain))
    try write(result, to: json)
  }
}

struct IsolationResult: Codable {
  var scheduler: String
  var soloP50Microseconds: Double
  var soloP99Microseconds: Double
  var floodP50Microseconds: Double
  var floodP99Microseconds: Double
  var heavyJobDeviceMicroseconds: Double
  var boundMicroseconds: Double
  var lightJobs: Int
}

/// A light tenant's latency alone and under a flood of 1 MiB jobs from two heavy tenants.
struct Isolation: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Light-tenant p50/p99 alone and under a heavy flood.")
  @Option var target = "127.0.0.1:50051"
  @Option var label = "fair"
  @Option(help: "Key of the light tenant.") var lightKey: String
  @Option(help: "Keys of the heavy tenants.") var heavyKey: [String] = []
  @Option var seconds: Double = 10
  @Option var heavyCallers = 12
  @Option var json = ".build-bench/isolation.json"

  func run() async throws {
    let light = TenantLoad(name: "light", key: lightKey, weight: 1, callers: 1, sizes: [4096])
    let solo = try await drive(target: target, loads: [light], seconds: 4, warmup: 1, cooldown: 0.5)[0]
    let heavies = heavyKey.enumerated().map {
      TenantLoad(name: "heavy\($0.offset)", key: $0.element, weight: 1, callers: heavyCallers, sizes: [1 << 20])
    }
    let flood = try await drive(target: target, loads: [light] + heavies, seconds: seconds, warmup: 2, cooldown: 1)
    let lightFlood = flood.first { $0.tenant == "light" }!
    let heavyJobs = flood.filter { $0.tenant != "light" }
    let heavyJob =
      Double(heavyJobs.map(\.deviceNanoseconds).reduce(0, +)) / Double(max(1, heavyJobs.map(\.jobs).reduce(0, +))) / 1000
    let soloP99 = percentile(solo.latenciesMicroseconds, 0.99)
    let result = IsolationResult(
      scheduler: label, soloP50Microseconds: percentile(solo.latenciesMicroseconds, 0.5), soloP99Microseconds: soloP99,
      floodP50Microseconds: percentile(lightFlood.latenciesMicroseconds, 0.5),
      floodP99Microseconds: percentile(lightFlood.latenciesMicroseconds, 0.99), heavyJobDeviceMicroseconds: heavyJob,
      boundMicroseconds: soloP99 + heavyJob, lightJobs: lightFlood.jobs)
    print(
      String(
        format: "%@ light solo p50 %.0f us p99 %.0f us | under flood p50 %.0f us p99 %.0f us | heavy job %.0f us | bound %.0f us",
        label, result.soloP50Microseconds, result.soloP99Microseconds, result.floodP50Microseconds,
        result.floodP99Microseconds, heavyJob, result.boundMicroseconds))
    try write(result, to: json)
  }
}

func write(_ value: some Encodable, to path: String) throws {
  try FileManager.default.createDirectory(
    at: URL(fileURLWithPath: path).deletingLastPathComponent(), withIntermediateDirectories: true)
  let e = JSONEncoder()
  e.outputFormatting = [.prettyPrinted, .sortedKeys]
  try e.encode(value).write(to: URL(fileURLWithPath: path))
}
