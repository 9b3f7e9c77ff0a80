import AccelDevice
import AccelService
import ArgumentParser
import Dispatch
import Logging

#if canImport(Glibc)
  import Glibc
#endif

/// `accelgate`: the AccelGate gateway. Argument parsing only; the work lives in AccelService.
@main
struct AccelGate: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "accelgate",
    abstract: "Share compression and crypto accelerators between tenants over gRPC.",
    subcommands: [Serve.self],
    defaultSubcommand: Serve.self
  )
}

struct Serve: AsyncParsableCommand {
  static let configuration = CommandConfiguration(abstract: "Serve gRPC with the embedded emulated device.")

  @Option(help: "Address to listen on.") var host = ServiceConfiguration.defaults.host
  @Option(help: "Port to listen on (0 picks a free port).") var port = ServiceConfiguration.defaults.port
  @Option(help: "Largest request payload, in bytes.") var maxRequestBytes = ServiceConfiguration.defaults.maxRequestBytes
  @Option(help: "Largest decompressed output, in bytes.")
  var maxDecompressedBytes = ServiceConfiguration.defaults.maxDecompressedBytes
  @Option(help: "Jobs allowed to wait for the device.") var maxQueuedJobs = ServiceConfiguration.defaults.maxQueuedJobs
  @Option(help: "Descriptors in flight per hardware queue.")
  var inFlightPerQueue = ServiceConfiguration.defaults.inFlightPerQueue
  @Option(help: "Most descriptors per doorbell.") var maxBatch = ServiceConfiguration.defaults.maxBatch
  @Option(help: "Deadline in milliseconds for calls that set none.") var defaultDeadlineMs = 30_000
  @Option(help: "Hardware queues on the embedded device.") var queues = DeviceConfiguration.defaults.queueCount
  @Option(help: "Engine threads on the embedded device.") var engines = DeviceConfiguration.defaults.engineCount
  @Option(help: "Submission ring entries per queue (power of two).")
  var sqEntries = Int(DeviceConfiguration.defaults.sqEntries)
  @Option(help: "Data pool per queue, in MiB.") var poolMib = Int(DeviceConfiguration.defaults.dataPoolBytes >> 20)
  @Option(help: "Per-engine throughput cap in MB/s (0 = uncapped).") var engineCapMbps: Double = 0
  @Option(help: "Engine idle spin before parking, in microseconds.") var idleSpinUs = 50
  @Option(help: "Log level (trace, debug, info, notice, warning, error).") var logLevel = "info"

  func run() async throws {
    var logger = Logger(label: "accelgate")
    logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
    let config = ServiceConfiguration.defaults {
      $0.host = host
      $0.port = port
      $0.maxRequestBytes = maxRequestBytes
      $0.maxDecompressedBytes = maxDecompressedBytes
      $0.maxQueuedJobs = maxQueuedJobs
      $0.inFlightPerQueue = inFlightPerQueue
      $0.maxBatch = maxBatch
      $0.defaultDeadline = .milliseconds(defaultDeadlineMs)
      $0.device.queueCount = queues
      $0.device.engineCount = engines
      $0.device.sqEntries = UInt32(sqEntries)
      $0.device.dataPoolBytes = UInt64(poolMib) << 20
      $0.device.engineThroughputCapMBps = engineCapMbps > 0 ? engineCapMbps : nil
      $0.device.idleSpin = .microseconds(idleSpinUs)
    }
    let server = try AccelGateServer(configuration: config, logger: logger)
    let signals = SignalHandler { server.shutdown() }
    try await withThrowingDiscardingTaskGroup { group in
      group.addTask { try await server.serve() }
      if let port = try await server.listeningPort() {
        logger.info(
          "serving",
          metadata: [
            "address": "\(host):\(port)", "queues": "\(queues)", "engines": "\(engines)",
            "max_request_bytes": "\(maxRequestBytes)",
          ])
        // A line scripts can wait for.
        print("accelgate listening on \(host):\(port)")
        fflush(nil)
      }
    }
    _ = signals
  }
}

/// Turns SIGINT/SIGTERM into a graceful shutdown.
final class SignalHandler: @unchecked Sendable {
  private let sources: [any DispatchSourceSignal]
  init(_ onSignal: @escaping @Sendable () -> Void) {
    var sources: [any DispatchSourceSignal] = []
    for sig in [SIGINT, SIGTERM] {
      signal(sig, SIG_IGN)
      let s = DispatchSource.makeSignalSource(signal: sig)
      s.setEventHandler(handler: onSignal)
      s.resume()
      sources.append(s)
    }
    self.sources = sources
  }
}
