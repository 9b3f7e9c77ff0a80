import AccelProto
import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf

/// `accelctl`: the AccelGate command line client.
@main
struct AccelCtl: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "accelctl",
    abstract: "Talk to an AccelGate server.",
    subcommands: [Compress.self, Decompress.self, Encrypt.self, Decrypt.self, Digest.self, Status.self, Describe.self, Bench.self]
  )
}

/// Connection options shared by every verb.
struct ConnectionOptions: ParsableArguments {
  @Option(name: .shortAndLong, help: "Server address host:port.") var target = "127.0.0.1:50051"
  @Option(help: "API key, sent as 'authorization: Bearer <key>'.") var apiKey: String?
  @Option(help: "Call deadline in seconds.") var timeout: Double = 30

  func withClient<R: Sendable>(
    _ body: @Sendable (Accelgate_V1_Accelerator.Client<HTTP2ClientTransport.Posix>) async throws -> R
  ) async throws -> R {
    let parts = target.split(separator: ":")
    guard parts.count == 2, let port = Int(parts[1]) else { throw ValidationError("target must be host:port") }
    return try await withGRPCClient(
      transport: .http2NIOPosix(
        target: .dns(host: String(parts[0]), port: port), transportSecurity: .plaintext,
        config: .defaults {
          $0.http2.maxFrameSize = 1 << 20
          $0.http2.targetWindowSize = 16 << 20
        }),
      handleClient: { client in try await body(Accelgate_V1_Accelerator.Client(wrapping: client)) }
    )
  }

  var callOptions: CallOptions {
    var o = CallOptions.defaults
    o.timeout = .milliseconds(Int64(timeout * 1000))
    o.maxResponseMessageBytes = 64 << 20
    o.maxRequestMessageBytes = 64 << 20
    return o
  }

  var metadata: Metadata { metadata(apiKey: apiKey) }

  func metadata(apiKey: String?) -> Metadata {
    var m = Metadata()
    if let apiKey { m.addString("Bearer \(apiKey)", forKey: "authorization") }
    return m
  }

  static func make(target: String, timeout: Double) -> ConnectionOptions {
    var c = ConnectionOptions()
    c.target = target
    c.timeout = timeout
    return c
  }
}

enum FormatArgument: String, ExpressibleByArgument, CaseIterable {
  case deflate, zlib, gzip, zstd, lz4
  var proto: Accelgate_V1_CompressionFormat {
    switch self {
    case .zstd: .zstd
    case .lz4: .lz4
    case .deflate: .deflate
    case .zlib: .zlib
    case .gzip: .gzip
    }
  }
}

struct IOOptions: ParsableArguments {
  @Option(name: .shortAndLong, help: "Input file ('-' for stdin).") var input = "-"
  @Option(name: .shortAndLong, help: "Output file ('-' for stdout).") var output = "-"
  @Flag(help: "Print job statistics to stderr.") var stats = false

  func read() throws -> Data {
    input == "-" ? FileHandle.standardInput.readDataToEndOfFile() : try Data(contentsOf: URL(fileURLWithPath: input))
  }

  func write(_ data: Data) throws {
    if output == "-" { FileHandle.standardOutput.write(data) } else { try data.write(to: URL(fileURLWithPath: output)) }
  }
}

struct Compress: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Compress a file.",
    discussion: """
      Input larger than the server's request limit is sent in chunks. For gzip, zstd and lz4 \
      the chunks become members (frames) of one valid file, as those formats allow; deflate \
      and zlib need a single job, so their input must fit the limit.
      """)
  @OptionGroup var connection: ConnectionOptions
  @OptionGroup var io: IOOptions
  @Option(help: "deflate, zlib, gzip, zstd or lz4.") var format: FormatArgument = .gzip
  @Option(help: "Level 0-9 (default 6).") var level: Int32?
  @Option(help: "Chunk size for large gzip input, in bytes.") var chunkBytes = 4 << 20

  func run() async throws {
    let data = try io.read()
    let chunk = max(1, chunkBytes)
    guard data.count <= chunk || [.gzip, .zstd, .lz4].contains(format) else {
      throw ValidationError("\(format.rawValue) input over \(chunk) bytes needs streaming; use --format gzip, zstd or lz4")
    }
    let (format, level, connection, showStats) = (format, level, connection, io.stats)
    let output = try await connection.withClient { client -> Data in
      var out = Data()
      let progress = ProgressBar(total: data.count, label: "compress")
      var offset = 0
      repeat {
        let end = min(data.count, offset + chunk)
        let request = Accelgate_V1_CompressRequest.with {
          $0.format = format.proto
          if let level { $0.level = level }
          $0.data = data.subdata(in: offset..<end)
        }
        let response = try await client.compress(request, metadata: connection.metadata, options: connection.callOptions)
        out.append(response.data)
        if showStats { printStats(response.stats) }
        offset = end
        progress.update(offset)
      } while offset < data.count
      progress.finish()
      return out
    }
    try io.write(output)
  }
}

struct Decompress: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Decompress a file.")
  @OptionGroup var connection: ConnectionOptions
  @OptionGroup var io: IOOptions
  @Option(help: "deflate, zlib, gzip, zstd or lz4.") var format: FormatArgument = .gzip
  @Option(help: "Cap on the decompressed size in bytes (0 = the server's limit).") var maxOutputBytes: UInt64 = 0

  func run() async throws {
    let data = try io.read()
    let (format, maxOutputBytes, connection, showStats) = (format, maxOutputBytes, connection, io.stats)
    let response = try await connection.withClient { client in
      try await client.decompress(
        .with {
          $0.format = format.proto
          $0.data = data
          $0.maxOutputBytes = maxOutputBytes
        }, metadata: connection.metadata, options: connection.callOptions)
    }
    if showStats { printStats(response.stats) }
    try io.write(response.data)
  }
}

struct Describe: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Describe the device: queues, engines, algorithms, limits.")
  @OptionGroup var connection: ConnectionOptions
  @Flag(help: "Print JSON instead of text.") var json = false

  func run() async throws {
    let connection = connection
    let d = try await connection.withClient { client in
      try await client.describeDevice(
        Accelgate_V1_DescribeDeviceRequest(), metadata: connection.metadata, options: connection.callOptions)
    }
    if json {
      print(try d.jsonString())
      return
    }
    print("device  \(d.device.name) (\(d.device.mode), ABI \(d.device.abiVersion)) \(d.device.healthy ? "healthy" : "UNHEALTHY")")
    for q in d.queues {
      print(
        "queue   \(q.id): \(q.state), sq \(q.sqEntries), pool \(q.dataPoolBytes >> 20) MiB, weight \(q.weight), in flight \(q.inFlight), completed \(q.completed)"
      )
    }
    for e in d.engines {
      print("engine  \(e.id): \(e.jobs) jobs, busy \(e.busyNs / 1_000_000) ms\(e.throughputCapMbps > 0 ? ", cap \(e.throughputCapMbps) MB/s" : "")")
    }
    for c in d.capabilities {
      print("alg     \(c.operation) \(c.format)\(c.operation == .compress ? " levels \(c.minLevel)-\(c.maxLevel)" : ""): \(c.engines)")
    }
    let l = d.limits
    print("limits  request \(l.maxRequestBytes) B, decompressed \(l.maxDecompressedBytes) B, queued jobs \(l.maxQueuedJobs), in flight/queue \(l.inFlightPerQueue), batch \(l.maxBatch), default deadline \(l.defaultDeadlineMs) ms")
  }
}

func printStats(_ s: Accelgate_V1_JobStats) {
  FileHandle.standardError.write(
    Data(
      "job: \(s.inputBytes) B -> \(s.outputBytes) B, queue wait \(s.queueWaitNs / 1000) us, device \(s.deviceNs / 1000) us, total \(s.totalNs / 1000) us, queue \(s.queueID), engine \(s.engineID) (\(s.engine)), batch \(s.batchSize)\n"
        .utf8))
}

/// A progress bar on stderr, drawn only when stderr is a terminal and the work is long.
final class ProgressBar: @unchecked Sendable {
  let total: Int
  let label: String
  let enabled: Bool
  let start = Date()

  init(total: Int, label: String, force: Bool = false) {
    self.total = total
    self.label = label
    self.enabled = isatty(STDERR_FILENO) == 1 && (force || total > 4 << 20)
  }

  func update(_ done: Int) {
    guard enabled else { return }
    let width = 30
    let fraction = total == 0 ? 1 : Double(done) / Double(total)
    let filled = Int(fraction * Double(width))
    let elapsed = max(0.001, Date().timeIntervalSince(start))
    let rate = Double(done) / elapsed / 1e6
    let bar = String(repeating: "#", count: min(width, filled)) + String(repeating: ".", count: max(0, width - filled))
    let line = String(format: "\r%@ [%@] %3.0f%% %.1f MB/s", label, bar, min(1, fraction) * 100, rate)
    FileHandle.standardError.write(Data(line.utf8))
  }

  func finish() { if enabled { FileHandle.standardError.write(Data("\n".utf8)) } }
}
