import AccelDevice
import AccelProto
import AccelMessages
import AccelService
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Testing

/// A whole gateway on port 0, called through grpc-swift's own client.
@Suite(.timeLimit(.minutes(2))) struct EndToEndTests {
  func withServer(
    _ configure: (inout ServiceConfiguration) -> Void = { _ in },
    _ body: (Accelgate_V1_Accelerator.Client<HTTP2ClientTransport.Posix>, AccelGateServer) async throws -> Void
  ) async throws {
    let config = ServiceConfiguration.defaults {
      $0.port = 0
      $0.metricsPort = 0
      $0.device.engineCount = 1
      $0.device.dataPoolBytes = 16 << 20
      $0.device.idleSpin = .microseconds(10)
      configure(&$0)
    }
    let server = try AccelGateServer(configuration: config)
    try await withThrowingTaskGroup(of: Void.self) { group in
      group.addTask { try await server.serve() }
      var port: Int?
      for _ in 0..<200 where port == nil {
        port = try await server.listeningPort()
        if port == nil { try await Task.sleep(for: .milliseconds(10)) }
      }
      let p = try #require(port)
      try await withGRPCClient(
        transport: .http2NIOPosix(
          target: .ipv4(address: "127.0.0.1", port: p), transportSecurity: .plaintext,
          config: .defaults {
          $0.http2.maxFrameSize = 1 << 20
          $0.http2.targetWindowSize = 16 << 20
        })
      ) { client in
        try await body(Accelgate_V1_Accelerator.Client(wrapping: client), server)
      }
      server.shutdown()
      try await group.waitForAll()
    }
  }

  @Test func compressThenDecompressRoundTripsEveryFormat() async throws {
    try await withServer { client, _ in
      let text = Data(String(repeating: "the quick brown fox jumps over the lazy dog ", count: 3000).utf8)
      for format in [Accelgate_V1_CompressionFormat.deflate, .zlib, .gzip] {
        for level: Int32 in [0, 1, 6, 9] {
          let c = try await client.compress(.with { $0.format = format; $0.level = level; $0.data = text })
          #expect(c.data.count < text.count || level == 0)
          #expect(c.stats.inputBytes == UInt64(text.count))
          #expect(c.stats.outputBytes == UInt64(c.data.count))
          #expect(c.stats.deviceNs > 0)
          let d = try await client.decompress(.with { $0.format = format; $0.data = c.data })
          #expect(d.data == text, "\(format) level \(level)")
        }
      }
    }
  }

  @Test func errorsCarryTheDocumentedStatus() async throws {
    try await withServer({ $0.maxRequestBytes = 1 << 20 }) { client, _ in
      await #expect(throws: RPCError.self) { _ = try await client.compress(.with { $0.format = .unspecified }) }
      do {
        _ = try await client.compress(.with { $0.format = .gzip; $0.level = 12 })
        Issue.record("level 12 accepted")
      } catch let e as RPCError { #expect(e.code == .invalidArgument) }
      do {
        _ = try await client.decompress(.with { $0.format = .zlib; $0.data = Data("not zlib at all".utf8) })
        Issue.record("garbage accepted")
      } catch let e as RPCError { #expect(e.code == .invalidArgument) }
      do {
        _ = try await client.compress(.with { $0.format = .gzip; $0.data = Data(count: (1 << 20) + 1) })
        Issue.record("oversize accepted")
      } catch let e as RPCError {
        #expect(e.code == .resourceExhausted)
        #expect(e.metadata[stringValues: "retry-after-ms"].first(where: { _ in true }) == nil)
      }
      // Bomb: 4 MiB of zeros against a 64 KiB caller cap.
      let bomb = try await client.compress(.with { $0.format = .gzip; $0.level = 9; $0.data = Data(count: 1 << 20) })
      do {
        _ = try await client.decompress(.with { $0.format = .gzip; $0.data = bomb.data; $0.maxOutputBytes = 65536 })
        Issue.record("bomb accepted")
      } catch let e as RPCError { #expect(e.code == .resourceExhausted) }
      // Still serving.
      let ok = try await client.compress(.with { $0.format = .zlib; $0.data = Data() })
      #expect(!ok.data.isEmpty)
    }
  }

  @Test func describeDeviceReportsQueuesAndLimits() async throws {
    try await withServer({ $0.device.queueCount = 3; $0.maxQueuedJobs = 77 }) { client, _ in
      let d = try await client.describeDevice(Accelgate_V1_DescribeDeviceRequest())
      #expect(d.queues.count == 3)
      #expect(d.engines.count == 1)
      #expect(d.limits.maxQueuedJobs == 77)
      #expect(d.device.abiVersion == "1.4")
      #expect(d.capabilities.contains { $0.operation == .compress && $0.format == .gzip && $0.maxLevel == 9 })
    }
  }

  @Test func metricsCountCallsJobsAndDeviceState() async throws {
    try await withServer({ $0.device.queueCount = 2 }) { client, server in
      let text = Data(String(repeating: "metrics ", count: 5000).utf8)
      for _ in 0..<3 { _ = try await client.compress(.with { $0.format = .gzip; $0.level = 1; $0.data = text }) }
      await #expect(throws: RPCError.self) { _ = try await client.decompress(.with { $0.format = .gzip; $0.data = Data("x".utf8) }) }
      let m = server.renderMetrics()
      #expect(m.contains(#"accelgate_requests_total{method="Compress",code="OK",tenant="default"} 3"#), "\(m)")
      #expect(m.contains(#"accelgate_requests_total{method="Decompress",code="INVALID_ARGUMENT",tenant="default"} 1"#))
      #expect(m.contains(#"accelgate_jobs_total{tenant="default",operation="compress",algorithm="gzip",outcome="ok"} 3"#))
      #expect(
        m.contains(#"accelgate_jobs_total{tenant="default",operation="decompress",algorithm="gzip",outcome="job_error"} 1"#))
      #expect(m.contains(#"accelgate_request_duration_seconds_count{method="Compress"} 3"#))
      #expect(m.contains("# TYPE accelgate_device_seconds_total counter"))
      #expect(m.contains(#"accelgate_queue_healthy{queue="1"} 1"#))
      #expect(m.contains("accelgate_device_attached 1"))
      // Counters that mirror driver state only ever grow between scrapes.
      let completions = { (s: String) -> Double in
        s.split(separator: "\n").filter { $0.hasPrefix("accelgate_queue_completions_total{") }
          .compactMap { Double($0.split(separator: " ").last!) }.reduce(0, +)
      }
      #expect(completions(m) == 4)
      _ = try await client.compress(.with { $0.format = .zlib; $0.data = text })
      #expect(completions(server.renderMetrics()) == 5)
      #expect(server.metricsPort != nil)
    }
  }
}
