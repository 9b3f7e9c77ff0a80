import AccelGateLocal
import AccelProto
import AccelMessages
import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import Histogram
import SwiftProtobuf

/// `accelctl bench`: a load generator. Closed loop by default (each worker sends
/// its next call when the last one returns); with `--rate` an open loop whose
/// latencies are measured from each call's scheduled start, so a slow server
/// cannot hide queueing (no coordinated omission).
struct Bench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Load-test a server: concurrency, operation mix, sizes, tenants, duration, rate.",
    discussion: """
      Prints HdrHistogram latency percentiles and throughput per operation, and writes them \
      as JSON (--json) and as an SVG latency-by-percentile plot (--plot).
      Example: accelctl bench -c 16 --duration 10 --mix compress:3,decompress:1,encrypt:1,digest:1 --sizes 4K,64K,1M
      """)
  @Option(name: .shortAndLong, help: "Server address host:port, or unix:PATH (then the local lane: shared memory).")
  var target = "127.0.0.1:50051"
  @Flag(help: "With a unix: target, carry payloads in messages instead of shared memory.") var noSharedMemory = false
  @Option(name: .shortAndLong, help: "Concurrent callers.") var concurrency = 8
  @Option(help: "Seconds to run.") var duration: Double = 10
  @Option(help: "Target calls per second over all callers (0 = closed loop, as fast as answers come).")
  var rate: Double = 0
  @Option(help: "Operation weights: compress, decompress, encrypt, decrypt, digest.") var mix = "compress:1"
  @Option(help: "Payload sizes to draw from (bytes; K and M suffixes).") var sizes = "64K"
  @Option(help: "API keys, one per tenant; callers are spread over them (repeatable).") var apiKey: [String] = []
  @Option(help: "Compression format for compress/decompress.") var format: FormatArgument = .gzip
  @Option(help: "Compression level.") var level: Int32 = 1
  @Option(help: "Write results as JSON here.") var json: String?
  @Option(help: "Write an SVG latency plot here.") var plot: String?
  @Option(help: "Per-call deadline in seconds.") var timeout: Double = 30

  enum Op: String, CaseIterable, Sendable { case compress, decompress, encrypt, decrypt, digest }

  struct Result: Codable {
    var operation: String
    var calls: UInt64
    var errors: [String: UInt64]
    var payloadBytes: UInt64
    var opsPerSecond: Double
    var megabytesPerSecond: Double
    var latencyMicroseconds: [String: UInt64]
  }

  struct Report: Codable {
    var target: String
    var concurrency: Int
    var durationSeconds: Double
    var rate: Double
    var mix: String
    var sizes: [Int]
    var tenants: Int
    var results: [Result]
    /// Latency (µs) at percentiles for the plot, all operations together.
    var distribution: [[Double]]
  }

  struct Tally: Sendable {
    var histograms: [Op: Histogram<UInt64>] = [:]
    var errors: [Op: [String: UInt64]] = [:]
    var bytes: [Op: UInt64] = [:]
    mutating func merge(_ o: Tally) {
      for (op, h) in o.histograms { histograms[op, default: Self.histogram()].add(h) }
      for (op, e) in o.errors { for (k, v) in e { errors[op, default: [:]][k, default: 0] += v } }
      for (op, b) in o.bytes { bytes[op, default: 0] += b }
    }
    static func histogram() -> Histogram<UInt64> {
      var h = Histogram<UInt64>(highestTrackableValue: 600_000_000, numberOfSignificantValueDigits: .three)
      h.autoResize = true
      return h
    }
  }

  static func parseSize(_ s: Substring) -> Int? {
    let t = s.trimmingCharacters(in: .whitespaces).uppercased()
    if t.hasSuffix("K"), let v = Int(t.dropLast()) { return v << 10 }
    if t.hasSuffix("M"), let v = Int(t.dropLast()) { return v << 20 }
    return Int(t)
  }

  func run() async throws {
    let sizeList = try sizes.split(separator: ",").map { s -> Int in
      guard let v = Self.parseSize(s), v >= 0, v <= 64 << 20 else { throw ValidationError("bad size '\(s)'") }
      return v
    }
    var weighted: [Op] = []
    for part in mix.split(separator: ",") {
      let kv = part.split(separator: ":")
      guard let op = Op(rawValue: String(kv[0])), let w = kv.count > 1 ? Int(kv[1]) : 1, w >= 0 else {
        throw ValidationError("bad mix entry '\(part)'; use op:weight with op in \(Op.allCases.map(\.rawValue))")
      }
      weighted += Array(repeating: op, count: w)
    }
    guard !weighted.isEmpty, !sizeList.isEmpty, concurrency >= 1, duration > 0 else { throw ValidationError("nothing to run") }
    let connection = ConnectionOptions.make(target: target, timeout: timeout, sharedMemory: !noSharedMemory)
    let keys = apiKey.isEmpty ? [nil] : apiKey.map { Optional($0) }
    let (concurrency, duration, rate, format, level) = (concurrency, duration, rate, format, level)
    let ops = weighted

    let started = Date()
    let tally = try await connection.withClient { client -> Tally in
      // Payloads: compressible text; one sealed and one compressed copy per size for the inverse ops.
      let aead = Data((0..<32).map { _ in UInt8.random(in: 0...255) })
      var plain: [Int: Data] = [:]
      var compressed: [Int: Data] = [:]
      var sealed: [Int: (Data, Data)] = [:]
      let words = ["accel", "gate", "ring", "queue", "tenant", "device", "engine", "doorbell", "fair", "share"]
      for size in Set(sizeList) {
        var text = ""
        text.reserveCapacity(size + 64)
        var i = 0
        while text.utf8.count < size { text += "\(i) \(words[i % words.count]) \(words[(i * 7) % words.count])\n"; i += 1 }
        let p = Data(text.utf8.prefix(size))
        plain[size] = p
        let md = connection.metadata(apiKey: keys[0])
        if ops.contains(.decompress) {
          compressed[size] = try await client.compress(
            .with { $0.format = format.proto; $0.level = level; $0.data = p }, metadata: md, options: connection.callOptions
          ).data
        }
        if ops.contains(.decrypt) {
          let r = try await client.encrypt(
            .with { $0.algorithm = .aes256Gcm; $0.key = .with { $0.raw = aead }; $0.plaintext = p }, metadata: md,
            options: connection.callOptions)
          sealed[size] = (r.nonce, r.ciphertext)
        }
      }
      let deadline = ContinuousClock.now + .milliseconds(Int64(duration * 1000))
      let progress = ProgressBar(total: Int(duration * 1000), label: "bench", force: true)
      let start = ContinuousClock.now
      // Local lane: each worker gets its own shared memory per size, holding the
      // inputs once; calls then carry spans, not payloads.
      var lanes: [LocalLane] = []
      var regions: [[Int: LocalSpans]] = []
      if connection.localSocketPath != nil && !connection.noSharedMemory {
        for worker in 0..<concurrency {
          let lane = try LocalLane(
            controlSocket: connection.localControl ?? LocalLane.controlSocket(forGRPCSocket: connection.localSocketPath!),
            apiKey: keys[worker % keys.count])
          lanes.append(lane)
          var bySize: [Int: LocalSpans] = [:]
          for size in Set(sizeList) {
            bySize[size] = try LocalSpans(
              lane: lane, plain: plain[size]!, compressed: compressed[size], sealed: sealed[size]?.1)
          }
          regions.append(bySize)
        }
      }
      return try await withThrowingTaskGroup(of: Tally.self) { group in
        for worker in 0..<concurrency {
          let md = connection.metadata(apiKey: keys[worker % keys.count])
          let (plain, compressed, sealed) = (plain, compressed, sealed)
          let local = regions.isEmpty ? nil : regions[worker]
          group.addTask {
            var t = Tally()
            var rng = SystemRandomNumberGenerator()
            var n = 0
            // Open loop: worker w owns slots w, w+c, w+2c… of a schedule at `rate` calls/s.
            let interval: Duration? = rate > 0 ? .nanoseconds(Int64(1e9 * Double(concurrency) / rate)) : nil
            var scheduled = start + (interval.map { $0 * Double(worker) / Double(concurrency) } ?? .zero)
            while ContinuousClock.now < deadline {
              if interval != nil {
                if scheduled > .now { try await Task.sleep(until: scheduled, clock: .continuous) }
              } else {
                scheduled = .now
              }
              let op = ops.randomElement(using: &rng)!
              let size = sizeList.randomElement(using: &rng)!
              var code = "OK"
              do {
                if let l = local?[size] {
                  try await l.run(op, client: client, format: format.proto, level: level, key: aead,
                    nonce: sealed[size]?.0, metadata: md, options: connection.callOptions)
                } else {
                switch op {
                case .compress:
                  _ = try await client.compress(
                    .with { $0.format = format.proto; $0.level = level; $0.data = plain[size]! }, metadata: md,
                    options: connection.callOptions)
                case .decompress:
                  _ = try await client.decompress(
                    .with { $0.format = format.proto; $0.data = compressed[size]! }, metadata: md,
                    options: connection.callOptions)
                case .encrypt:
                  _ = try await client.encrypt(
                    .with { $0.algorithm = .aes256Gcm; $0.key = .with { $0.raw = aead }; $0.plaintext = plain[size]! },
                    metadata: md, options: connection.callOptions)
                case .decrypt:
                  let (nonce, ct) = sealed[size]!
                  _ = try await client.decrypt(
                    .with { $0.algorithm = .aes256Gcm; $0.key = .with { $0.raw = aead }; $0.nonce = nonce; $0.ciphertext = ct },
                    metadata: md, options: connection.callOptions)
                case .digest:
                  _ = try await client.digest(.with { $0.algorithm = .sha256; $0.data = plain[size]! }, metadata: md,
                    options: connection.callOptions)
                }
                }
              } catch let e as RPCError {
                code = "\(e.code)"
              }
              let micros = UInt64(max(0, (ContinuousClock.now - scheduled).microseconds))
              if code == "OK" {
                _ = t.histograms[op, default: Tally.histogram()].record(max(1, micros))
                t.bytes[op, default: 0] += UInt64(size)
              } else {
                t.errors[op, default: [:]][code, default: 0] += 1
              }
              if let interval { scheduled = scheduled + interval }
              n += 1
              if worker == 0 && n % 16 == 0 { progress.update(Int((ContinuousClock.now - start).microseconds / 1000)) }
            }
            return t
          }
        }
        var all = Tally()
        for try await t in group { all.merge(t) }
        progress.finish()
        withExtendedLifetime(lanes) {}
        return all
      }
    }
    let elapsed = Date().timeIntervalSince(started)
    try report(tally, elapsed: min(elapsed, duration + 1), sizes: sizeList, tenants: keys.count)
  }

  func report(_ tally: Tally, elapsed: Double, sizes: [Int], tenants: Int) throws {
    let percentiles: [(String, Double)] = [("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)]
    var results: [Result] = []
    var all = Tally.histogram()
    for op in Op.allCases where tally.histograms[op] != nil || tally.errors[op] != nil {
      let h = tally.histograms[op] ?? Tally.histogram()
      all.add(h)
      var lat: [String: UInt64] = [:]
      for (name, p) in percentiles { lat[name] = h.totalCount > 0 ? h.valueAtPercentile(p) : 0 }
      lat["max"] = h.totalCount > 0 ? h.max : 0
      let bytes = tally.bytes[op] ?? 0
      results.append(
        Result(
          operation: op.rawValue, calls: h.totalCount, errors: tally.errors[op] ?? [:], payloadBytes: bytes,
          opsPerSecond: Double(h.totalCount) / duration, megabytesPerSecond: Double(bytes) / duration / 1e6,
          latencyMicroseconds: lat))
    }
    func pad(_ s: String, _ n: Int, left: Bool = false) -> String {
      let fill = String(repeating: " ", count: max(0, n - s.count))
      return left ? s + fill : fill + s
    }
    print(
      pad("operation", 10, left: true) + ["calls", "ops/s", "MB/s", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"].map {
        " " + pad($0, 9)
      }.joined() + "  errors")
    for r in results {
      let errs = r.errors.isEmpty ? "-" : r.errors.map { "\($0.key) \($0.value)" }.sorted().joined(separator: ", ")
      print(
        String(
          format: "%@ %9llu %9.1f %9.1f %9llu %9llu %9llu %9llu %9llu  %@", pad(r.operation, 10, left: true), r.calls, r.opsPerSecond,
          r.megabytesPerSecond, r.latencyMicroseconds["p50"]!, r.latencyMicroseconds["p90"]!, r.latencyMicroseconds["p99"]!,
          r.latencyMicroseconds["p99.9"]!, r.latencyMicroseconds["max"]!, errs))
    }
    var distribution: [[Double]] = []
    if all.totalCount > 0 {
      var p = 0.0
      while p < 99.999 {
        distribution.append([p, Double(all.valueAtPercentile(p))])
        p = p < 90 ? p + 5 : 100 - (100 - p) / 1.5
      }
      distribution.append([100, Double(all.max)])
    }
    let report = Report(
      target: target, concurrency: concurrency, durationSeconds: duration, rate: rate, mix: mix, sizes: sizes,
      tenants: tenants, results: results, distribution: distribution)
    if let json {
      let enc = JSONEncoder()
      enc.outputFormatting = [.prettyPrinted, .sortedKeys]
      try enc.encode(report).write(to: URL(fileURLWithPath: json))
    }
    if let plot, !distribution.isEmpty { try Self.svg(distribution, title: "\(mix) × \(sizes.count) sizes, c=\(concurrency)").write(toFile: plot, atomically: true, encoding: .utf8) }
  }

  /// Latency by percentile, with the x axis stretched toward the tail (1/(1-p)), as HdrHistogram plots are.
  static func svg(_ points: [[Double]], title: String) -> String {
    let (w, h, m) = (720.0, 400.0, 60.0)
    func x(_ p: Double) -> Double { m + (w - 2 * m) * log10(1 / max(1e-5, 1 - min(p, 99.999) / 100)) / 5 }
    let maxY = max(1, points.map { $0[1] }.max()!)
    func y(_ v: Double) -> Double { h - m - (h - 2 * m) * v / maxY }
    var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(w))\" height=\"\(Int(h))\" font-family=\"sans-serif\" font-size=\"12\">\n"
    s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"\(m)\" y=\"24\" font-size=\"14\">Latency by percentile: \(title)</text>\n"
    s += "<line x1=\"\(m)\" y1=\"\(h - m)\" x2=\"\(w - m)\" y2=\"\(h - m)\" stroke=\"black\"/>\n<line x1=\"\(m)\" y1=\"\(m)\" x2=\"\(m)\" y2=\"\(h - m)\" stroke=\"black\"/>\n"
    for (label, p) in [("0%", 0.0), ("90%", 90.0), ("99%", 99.0), ("99.9%", 99.9), ("99.99%", 99.99)] {
      s += "<text x=\"\(x(p) - 14)\" y=\"\(h - m + 18)\">\(label)</text>\n<line x1=\"\(x(p))\" y1=\"\(h - m)\" x2=\"\(x(p))\" y2=\"\(m)\" stroke=\"#ddd\"/>\n"
    }
    for i in 0...4 {
      let v = maxY * Double(i) / 4
      s += "<text x=\"4\" y=\"\(y(v) + 4)\">\(String(format: v >= 1000 ? "%.1f ms" : "%.0f us", v >= 1000 ? v / 1000 : v))</text>\n"
    }
    let path = points.map { String(format: "%.1f,%.1f", x($0[0]), y($0[1])) }.joined(separator: " ")
    s += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"\(path)\"/>\n</svg>\n"
    return s
  }
}

extension Duration {
  var microseconds: Int64 { components.seconds * 1_000_000 + components.attoseconds / 1_000_000_000_000 }
}

/// One bench worker's shared memory for one payload size (local lane): the
/// plaintext, its compressed and sealed forms, and room for any output.
struct LocalSpans: @unchecked Sendable {
  let region: SharedRegion
  let size: Int
  let compressedAt: Int, compressedCount: Int
  let sealedAt: Int, sealedCount: Int
  let outputAt: Int, room: Int

  init(lane: LocalLane, plain: Data, compressed: Data?, sealed: Data?) throws {
    size = plain.count
    compressedAt = size
    compressedCount = compressed?.count ?? 0
    sealedAt = compressedAt + compressedCount
    sealedCount = sealed?.count ?? 0
    outputAt = sealedAt + sealedCount
    room = size + size / 4 + 65536
    region = try lane.register(size: outputAt + room)
    region.write(plain, at: 0)
    if let compressed { region.write(compressed, at: compressedAt) }
    if let sealed { region.write(sealed, at: sealedAt) }
  }

  func run(
    _ op: Bench.Op, client: Accelgate_V1_Accelerator.Client<HTTP2ClientTransport.Posix>,
    format: Accelgate_V1_CompressionFormat, level: Int32, key: Data, nonce: Data?, metadata: Metadata, options: CallOptions
  ) async throws {
    let out = region.span(outputAt, room)
    switch op {
    case .compress:
      _ = try await client.compress(
        .with {
          $0.format = format
          $0.level = level
          $0.inputRegion = region.span(0, size)
          $0.outputRegion = out
        }, metadata: metadata, options: options)
    case .decompress:
      _ = try await client.decompress(
        .with {
          $0.format = format
          $0.inputRegion = region.span(compressedAt, compressedCount)
          $0.outputRegion = out
        }, metadata: metadata, options: options)
    case .encrypt:
      _ = try await client.encrypt(
        .with {
          $0.algorithm = .aes256Gcm
          $0.key = .with { $0.raw = key }
          $0.inputRegion = region.span(0, size)
          $0.outputRegion = out
        }, metadata: metadata, options: options)
    case .decrypt:
      _ = try await client.decrypt(
        .with {
          $0.algorithm = .aes256Gcm
          $0.key = .with { $0.raw = key }
          $0.nonce = nonce ?? Data()
          $0.inputRegion = region.span(sealedAt, sealedCount)
          $0.outputRegion = out
        }, metadata: metadata, options: options)
    case .digest:
      _ = try await client.digest(
        .with {
          $0.algorithm = .sha256
          $0.inputRegion = region.span(0, size)
        }, metadata: metadata, options: options)
    }
  }
}
