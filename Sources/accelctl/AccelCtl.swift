import AccelGateLocal
import AccelHTTP2
import AccelProto
import AccelMessages
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
    subcommands: [Compress.self, Decompress.self, Encrypt.self, Decrypt.self, Digest.self, Status.self, Health.self, Describe.self, Bench.self]
  )
}

/// Connection options shared by every verb.
struct ConnectionOptions: ParsableArguments {
  @Option(name: .shortAndLong, help: "Server address host:port, or unix:PATH for a co-located gateway's local socket.")
  var target = "127.0.0.1:50051"
  @Option(help: "API key, sent as 'authorization: Bearer <key>'.") var apiKey: String?
  @Option(help: "Call deadline in seconds.") var timeout: Double = 30
  @Option(help: "Local lane control socket [the unix: target's path + .ctl].") var localControl: String?
  @Flag(help: "With a unix: target, carry payloads in messages instead of shared memory.") var noSharedMemory = false

  func withClient<R: Sendable>(
    _ body: @Sendable (Accelgate_V1_Accelerator.Client<HTTP2ClientTransport.Posix>) async throws -> R
  ) async throws -> R {
    try await withRawClient { client in try await body(Accelgate_V1_Accelerator.Client(wrapping: client)) }
  }

  /// The connection as a plain `GRPCClient`, for services other than the accelerator (health).
  func withRawClient<R: Sendable>(
    _ body: @Sendable (GRPCClient<HTTP2ClientTransport.Posix>) async throws -> R
  ) async throws -> R {
    let resolved: any ResolvableTarget
    if let path = localSocketPath {
      resolved = .unixDomainSocket(path: path)
    } else {
      let parts = target.split(separator: ":")
      guard parts.count == 2, let port = Int(parts[1]) else { throw ValidationError("target must be host:port or unix:PATH") }
      resolved = .dns(host: String(parts[0]), port: port)
    }
    return try await withGRPCClient(
      transport: .http2NIOPosix(
        target: resolved, transportSecurity: .plaintext,
        config: .defaults {
          $0.http2.maxFrameSize = 1 << 20
          // 4 MiB: larger windows let swift-nio-http2 1.46 overflow its own stream
          // window (stale window updates summed while the socket is unwritable), which
          // ended about one large DecompressStream in five at 16 MiB. docs/STREAMING.md.
          $0.http2.targetWindowSize = 4 << 20
          // The client side of the unary flush deadlock (AccelHTTP2).
          $0.channelDebuggingCallbacks.onCreateHTTP2Stream = FlushDataFramesHandler.install
        }),
      handleClient: body
    )
  }

  /// Streams get no overall deadline unless --timeout was given explicitly large enough;
  /// each chunk is still bounded by the server's default deadline.
  var streamOptions: CallOptions {
    var o = callOptions
    o.timeout = .seconds(max(3600, Int64(timeout)))
    return o
  }

  var callOptions: CallOptions {
    var o = CallOptions.defaults
    o.timeout = .milliseconds(Int64(timeout * 1000))
    o.maxResponseMessageBytes = 64 << 20
    o.maxRequestMessageBytes = 64 << 20
    return o
  }

  var metadata: Metadata { metadata(apiKey: apiKey) }

  /// The local socket path of a `unix:PATH` (or `unix://PATH`) target.
  var localSocketPath: String? {
    guard target.hasPrefix("unix:") else { return nil }
    let rest = target.dropFirst("unix:".count)
    return String(rest.hasPrefix("//") ? rest.dropFirst(2) : rest)
  }

  /// The local lane (shared memory) for a `unix:` target, unless --no-shared-memory.
  func localLane() throws -> LocalLane? {
    guard let path = localSocketPath, !noSharedMemory else { return nil }
    return try LocalLane(controlSocket: localControl ?? LocalLane.controlSocket(forGRPCSocket: path), apiKey: apiKey)
  }

  func metadata(apiKey: String?) -> Metadata {
    var m = Metadata()
    if let apiKey { m.addString("Bearer \(apiKey)", forKey: "authorization") }
    return m
  }

  static func make(target: String, timeout: Double, sharedMemory: Bool = true) -> ConnectionOptions {
    var c = ConnectionOptions()
    c.target = target
    c.timeout = timeout
    c.apiKey = nil
    c.localControl = nil
    c.noSharedMemory = !sharedMemory
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
      Input up to --chunk-bytes goes in one call; larger input (or --stream) goes through \
      CompressStream, chunk by chunk, with flat memory and one standard stream as output \
      (deflate, zlib, gzip, zstd; lz4 is one-shot only).
      """)
  @OptionGroup var connection: ConnectionOptions
  @OptionGroup var io: IOOptions
  @Option(help: "deflate, zlib, gzip, zstd or lz4.") var format: FormatArgument = .gzip
  @Option(help: "Level (default: the format's).") var level: Int32?
  @Option(help: "Chunk size for streaming, in bytes (at most the server's request limit).") var chunkBytes = 4 << 20
  @Flag(help: "Stream even when the input fits one call.") var stream = false

  func run() async throws {
    let chunk = max(1, chunkBytes)
    let (format, level, connection, showStats) = (format, level, connection, io.stats)
    let source = try InputSource(io.input)
    if !stream && source.size.map({ $0 <= chunk }) == true {
      let data = try source.readAll()
      if let lane = try connection.localLane() {
        // Local lane: input and output in shared memory; no payload on the socket.
        let room = data.count + data.count / 4 + 65536
        let region = try lane.register(size: data.count + room)
        region.write(data, at: 0)
        let response = try await connection.withClient { client in
          try await client.compress(
            .with {
              $0.format = format.proto
              if let level { $0.level = level }
              $0.inputRegion = region.span(0, data.count)
              $0.outputRegion = region.span(data.count, room)
            }, metadata: connection.metadata, options: connection.callOptions)
        }
        if showStats { printStats(response.stats) }
        try io.write(region.read(data.count, Int(response.regionOutputLength)))
        return
      }
      let response = try await connection.withClient { client in
        try await client.compress(
          .with {
            $0.format = format.proto
            if let level { $0.level = level }
            $0.data = data
          }, metadata: connection.metadata, options: connection.callOptions)
      }
      if showStats { printStats(response.stats) }
      try io.write(response.data)
      return
    }
    guard format != .lz4 else { throw ValidationError("lz4 input over \(chunk) bytes: use --format zstd or gzip to stream") }
    let sink = try OutputSink(io.output)
    let progress = ProgressBar(total: source.size ?? 0, label: "compress", force: source.size != nil)
    let totals = try await connection.withClient { client in
      try await client.compressStream(
        request: StreamingClientRequest(metadata: connection.metadata) { writer in
          var first = true
          var sent = 0
          while true {
            let piece = try source.read(chunk)
            let final = piece.count < chunk && source.atEnd
            try await writer.write(
              .with {
                if first {
                  $0.format = format.proto
                  if let level { $0.level = level }
                }
                $0.data = piece
                $0.final = final
              })
            first = false
            sent += piece.count
            progress.update(sent)
            if final || piece.isEmpty { break }
          }
        }, options: connection.streamOptions
      ) { response in
        var last = Accelgate_V1_CompressStreamResponse()
        for try await r in response.messages {
          if !r.data.isEmpty { try sink.write(r.data) }
          last = r
        }
        return last
      }
    }
    progress.finish()
    try sink.close()
    if showStats {
      FileHandle.standardError.write(
        Data("stream: \(totals.totalIn) B -> \(totals.totalOut) B in \(totals.jobs) device jobs, device \(totals.deviceNs / 1000) us\n".utf8))
    }
  }
}

struct Decompress: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Decompress a file.",
    discussion: """
      Decompression goes through DecompressStream (the output size is not known up front), \
      with flat memory; lz4, which is one-shot only, and --one-shot use a single call.
      """)
  @OptionGroup var connection: ConnectionOptions
  @OptionGroup var io: IOOptions
  @Option(help: "deflate, zlib, gzip, zstd or lz4.") var format: FormatArgument = .gzip
  @Option(help: "Cap on the decompressed size in bytes (0 = the server's limit).") var maxOutputBytes: UInt64 = 0
  @Option(help: "Chunk size for streaming, in bytes.") var chunkBytes = 4 << 20
  @Flag(help: "Use one Decompress call (output up to the server's unary limit).") var oneShot = false

  func run() async throws {
    let chunk = max(1, chunkBytes)
    let (format, maxOutputBytes, connection, showStats) = (format, maxOutputBytes, connection, io.stats)
    let source = try InputSource(io.input)
    if oneShot || format == .lz4 {
      let data = try source.readAll()
      if let lane = try connection.localLane() {
        let room = Int(maxOutputBytes > 0 ? maxOutputBytes : 64 << 20)  // a sparse memfd: untouched pages cost nothing
        let region = try lane.register(size: data.count + room)
        region.write(data, at: 0)
        let response = try await connection.withClient { client in
          try await client.decompress(
            .with {
              $0.format = format.proto
              $0.maxOutputBytes = maxOutputBytes
              $0.inputRegion = region.span(0, data.count)
              $0.outputRegion = region.span(data.count, room)
            }, metadata: connection.metadata, options: connection.callOptions)
        }
        if showStats { printStats(response.stats) }
        try io.write(region.read(data.count, Int(response.regionOutputLength)))
        return
      }
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
      return
    }
    let sink = try OutputSink(io.output)
    let progress = ProgressBar(total: source.size ?? 0, label: "decompress", force: source.size != nil)
    _ = try await connection.withClient { client in
      try await client.decompressStream(
        request: StreamingClientRequest(metadata: connection.metadata) { writer in
          var first = true
          var sent = 0
          while true {
            let piece = try source.read(chunk)
            let final = piece.count < chunk && source.atEnd
            try await writer.write(
              .with {
                if first {
                  $0.format = format.proto
                  $0.maxOutputBytes = maxOutputBytes
                }
                $0.data = piece
                $0.final = final
              })
            first = false
            sent += piece.count
            progress.update(sent)
            if final || piece.isEmpty { break }
          }
        }, options: connection.streamOptions
      ) { response in
        for try await r in response.messages where !r.data.isEmpty { try sink.write(r.data) }
        return 0
      }
    }
    progress.finish()
    try sink.close()
  }
}

/// A file or stdin, read in pieces.
final class InputSource: @unchecked Sendable {
  let handle: FileHandle
  let size: Int?
  private(set) var atEnd = false

  init(_ path: String) throws {
    if path == "-" {
      handle = FileHandle.standardInput
      size = nil
    } else {
      handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
      size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? nil
    }
  }

  func read(_ n: Int) throws -> Data {
    var out = Data()
    while out.count < n {
      guard let piece = try handle.read(upToCount: n - out.count), !piece.isEmpty else {
        atEnd = true
        break
      }
      out.append(piece)
    }
    return out
  }

  func readAll() throws -> Data { try handle.readToEnd() ?? Data() }
}

/// A file or stdout, written in pieces.
final class OutputSink: @unchecked Sendable {
  let handle: FileHandle
  let path: String

  init(_ path: String) throws {
    self.path = path
    if path == "-" {
      handle = FileHandle.standardOutput
    } else {
      _ = FileManager.default.createFile(atPath: path, contents: nil)
      handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
      try handle.truncate(atOffset: 0)
    }
  }

  func write(_ data: Data) throws { try handle.write(contentsOf: data) }
  func close() throws { if path != "-" { try handle.close() } }
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
