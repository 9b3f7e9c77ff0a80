import AccelDevice
import AccelScheduler
import AccelService
import ArgumentParser
import CAccelSys
import Dispatch
import Foundation
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
    subcommands: [Serve.self, Device.self, HashKey.self, GenKey.self],
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
  @Option(help: "Estimated device time kept in flight per hardware queue, in microseconds (one job always fits).")
  var inFlightBudgetUs = 2000
  @Option(help: "Concurrent streams per HTTP/2 connection (advertised to clients).")
  var maxConcurrentStreams = ServiceConfiguration.defaults.maxConcurrentStreams
  @Option(help: "Most descriptors per doorbell.") var maxBatch = ServiceConfiguration.defaults.maxBatch
  @Option(help: "Deadline in milliseconds for calls that set none.") var defaultDeadlineMs = 30_000
  @Option(help: "Hardware queues on the embedded device.") var queues = DeviceConfiguration.defaults.queueCount
  @Option(help: "Engine threads on the embedded device.") var engines = DeviceConfiguration.defaults.engineCount
  @Option(help: "Submission ring entries per queue (power of two).")
  var sqEntries = Int(DeviceConfiguration.defaults.sqEntries)
  @Option(help: "Data pool per queue, in MiB.") var poolMib = Int(DeviceConfiguration.defaults.dataPoolBytes >> 20)
  @Option(help: "Per-engine throughput cap in MB/s (0 = uncapped).") var engineCapMbps: Double = 0
  @Option(help: "Engine idle spin before parking, in microseconds.") var idleSpinUs = 50
  @Option(help: "Tenants file (YAML); without it a single open 'default' tenant serves every call.")
  var tenants: String?
  @Option(help: "Standalone device to use, e.g. unix:///run/accelgate/dev0.sock (default: embedded device).")
  var device: String?
  @Option(help: "Arbitration weight of this gateway's queues on a shared device.") var queueWeight: UInt32 = 1
  @Option(help: "Keyring file (YAML) of named, versioned keys per tenant; reloaded on SIGHUP.") var keyring: String?
  @Option(help: "File persisting per-key-version nonce counts (JSON).") var nonceState: String?
  @Option(help: "Audit log of key operations (JSON lines).") var auditLog: String?
  @Option(help: "Scheduler: fair (weighted fair queuing by device time) or fifo (for comparison).")
  var scheduler: SchedulerArgument = .fair
  @Option(help: "Default per-tenant limit on queued jobs.") var tenantMaxQueuedJobs = TenantLimits.defaults.maxQueuedJobs
  @Option(help: "Default per-tenant limit on queued payload bytes.")
  var tenantMaxQueuedBytes = TenantLimits.defaults.maxQueuedBytes
  @Option(help: "Log level (trace, debug, info, notice, warning, error).") var logLevel = "info"
  @Flag(help: "With --device: serve from an embedded software device while the standalone one is down.")
  var softwareFallback = false
  @Flag(help: "Compress-and-verify: the device decompresses each compression result and compares it with the input.")
  var verifyCompression = false
  @Option(help: "Milliseconds without a completion before a job is declared lost and its queue reset.")
  var completionTimeoutMs = 5000
  @OptionGroup var faults: FaultOptions
  @Option(help: "Address for the Prometheus /metrics endpoint.") var metricsHost = ServiceConfiguration.defaults.metricsHost
  @Option(help: "Port for /metrics (0 picks a free port).") var metricsPort = ServiceConfiguration.defaults.metricsPort ?? 9464
  @Flag(help: "Serve no /metrics endpoint.") var noMetrics = false
  @Option(help: "On SIGTERM, milliseconds calls in flight may take to finish before the server stops anyway.")
  var drainGraceMs = 30_000

  func run() async throws {
    var logger = Logger(label: "accelgate")
    logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
    var config = ServiceConfiguration.defaults {
      $0.host = host
      $0.port = port
      $0.maxRequestBytes = maxRequestBytes
      $0.maxDecompressedBytes = maxDecompressedBytes
      $0.maxQueuedJobs = maxQueuedJobs
      $0.inFlightPerQueue = inFlightPerQueue
      $0.inFlightBudget = .microseconds(inFlightBudgetUs)
      $0.maxBatch = maxBatch
      $0.maxConcurrentStreams = maxConcurrentStreams
      $0.defaultDeadline = .milliseconds(defaultDeadlineMs)
      $0.device.queueCount = queues
      $0.device.engineCount = engines
      $0.device.sqEntries = UInt32(sqEntries)
      $0.device.dataPoolBytes = UInt64(poolMib) << 20
      $0.device.engineThroughputCapMBps = engineCapMbps > 0 ? engineCapMbps : nil
      $0.device.idleSpin = .microseconds(idleSpinUs)
      $0.tenantsFile = tenants
      $0.deviceAddress = device
      $0.queueWeight = queueWeight
      $0.keyringFile = keyring
      $0.nonceStateFile = nonceState
      $0.auditLogFile = auditLog
      $0.scheduler = scheduler.kind
      $0.defaultTenantLimits.maxQueuedJobs = tenantMaxQueuedJobs
      $0.defaultTenantLimits.maxQueuedBytes = tenantMaxQueuedBytes
      $0.softwareFallback = softwareFallback
      $0.verifyCompression = verifyCompression
      $0.completionTimeout = .milliseconds(completionTimeoutMs)
      $0.metricsHost = metricsHost
      $0.metricsPort = noMetrics ? nil : metricsPort
      $0.drainGrace = .milliseconds(drainGraceMs)
    }
    try faults.apply(to: &config.device)
    let server = try AccelGateServer(configuration: config, logger: logger)
    let log = logger
    let signals = SignalHandler(
      onTerminate: { server.shutdown() },
      onHangup: {
        switch server.reloadTenants() {
        case .success(let n): log.notice("tenants reloaded", metadata: ["tenants": "\(n)"])
        case .failure(let e): log.error("tenants reload failed; keeping the previous tenants", metadata: ["error": "\(e)"])
        }
      })
    try await withThrowingDiscardingTaskGroup { group in
      group.addTask { try await server.serve() }
      if let port = try await server.listeningPort() {
        logger.info(
          "serving",
          metadata: [
            "address": "\(host):\(port)", "queues": "\(queues)", "engines": "\(engines)",
            "max_request_bytes": "\(maxRequestBytes)", "scheduler": "\(scheduler.rawValue)",
            "tenants": "\(tenants ?? "open default tenant")",
          ])
        if let m = server.metricsPort { print("accelgate metrics on http://\(metricsHost):\(m)/metrics") }
        // A line scripts can wait for.
        print("accelgate listening on \(host):\(port)")
        fflush(nil)
      }
    }
    _ = signals
  }
}

/// `accelgate device`: a standalone emulated device that gateways share over a Unix socket.
struct Device: ParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Run a standalone device daemon; gateways attach with --device unix://PATH.")
  @Option(help: "Control socket path.") var socket = "/run/accelgate/dev0.sock"
  @Option(help: "Engine threads.") var engines = DeviceConfiguration.defaults.engineCount
  @Option(help: "Submission ring entries per queue (power of two).")
  var sqEntries = Int(DeviceConfiguration.defaults.sqEntries)
  @Option(help: "Data pool per queue, in MiB.") var poolMib = Int(DeviceConfiguration.defaults.dataPoolBytes >> 20)
  @Option(help: "Total bytes of queue regions, in MiB (0 = unbounded).") var memoryBudgetMib = 0
  @Option(help: "Per-engine throughput cap in MB/s (0 = uncapped).") var engineCapMbps: Double = 0
  @Option(help: "Engine idle spin before parking, in microseconds.") var idleSpinUs = 50
  @Option(help: "Another user id allowed to attach (root and the daemon's own user always are).")
  var allowUid: [UInt32] = []
  @OptionGroup var faults: FaultOptions
  @Flag(help: "Let attached peers change fault injection and lift isolation over the control socket (tests, drills).")
  var allowFaultControl = false

  func run() throws {
    var deviceConfiguration = DeviceConfiguration.defaults {
        $0.queueCount = 0
        $0.engineCount = engines
        $0.sqEntries = UInt32(sqEntries)
        $0.dataPoolBytes = UInt64(poolMib) << 20
        $0.memoryBudget = memoryBudgetMib > 0 ? UInt64(memoryBudgetMib) << 20 : nil
        $0.engineThroughputCapMBps = engineCapMbps > 0 ? engineCapMbps : nil
        $0.idleSpin = .microseconds(idleSpinUs)
      }
    try faults.apply(to: &deviceConfiguration)
    let device = try EmulatedDevice(configuration: deviceConfiguration)
    let logger = Logger(label: "accelgate.device")
    device.setEventHandler { logger.warning("\($0)") }
    device.start()
    var config = ControlServer.Configuration(socketPath: socket)
    config.allowedUIDs = Set(allowUid)
    config.allowFaultControl = allowFaultControl
    let server = try ControlServer(device: device, configuration: config) { logger.notice("\($0)") }
    let done = DispatchSemaphore(value: 0)
    let signals = SignalHandler(onTerminate: { done.signal() }, onHangup: {})
    server.start()
    print("accelgate device listening on \(socket)")
    fflush(nil)
    done.wait()
    _ = signals
    server.stop()
    device.stop()
  }
}

/// Device error handling and fault injection, shared by `serve` (embedded device) and `device`.
struct FaultOptions: ParsableArguments {
  @Option(help: "Queue errors within the isolation window that isolate the device.")
  var isolationThreshold = DeviceConfiguration.defaults.isolationThreshold
  @Option(help: "Isolation window, in milliseconds.") var isolationWindowMs = 10_000
  @Option(help: "Milliseconds an isolation lasts before the device lifts it (0 = until restart).")
  var isolationCooldownMs = 30_000
  @Option(
    help: ArgumentHelp(
      "Inject faults, for tests and drills: MODE[,every=N][,latency-ms=M][,queue=Q].",
      discussion: "MODE is one of: \(FaultInjection.Mode.allCases.map(\.rawValue).joined(separator: ", "))."))
  var injectFault: String?

  func apply(to device: inout DeviceConfiguration) throws {
    device.isolationThreshold = max(1, isolationThreshold)
    device.isolationWindow = .milliseconds(max(1, isolationWindowMs))
    device.isolationCooldown = isolationCooldownMs > 0 ? .milliseconds(isolationCooldownMs) : nil
    if let injectFault {
      do { device.faults = try FaultInjection(parsing: injectFault) } catch { throw ValidationError(error.description) }
    }
  }
}

/// Turns SIGINT/SIGTERM into a graceful shutdown and SIGHUP into a tenants reload.
///
/// A real signal handler feeds a self-pipe and a dedicated thread acts on it, so
/// a signal that arrives while the program starts is never dropped (ignoring the
/// signal first, as dispatch sources need, can lose one that races with setup).
final class SignalHandler: Sendable {
  init(onTerminate: @escaping @Sendable () -> Void, onHangup: @escaping @Sendable () -> Void) {
    let fd = [SIGINT, SIGTERM, SIGHUP].withUnsafeBufferPointer {
      accel_signal_pipe_install($0.baseAddress, Int32($0.count))
    }
    guard fd >= 0 else { return }
    let t = Thread {
      while true {
        let sig = accel_signal_pipe_wait(fd)
        if sig < 0 { return }
        if sig == SIGHUP { onHangup() } else { onTerminate() }
      }
    }
    t.name = "accel-signals"
    t.start()
  }
}

enum SchedulerArgument: String, ExpressibleByArgument, CaseIterable {
  case fair, fifo
  var kind: SchedulerKind { self == .fair ? .fair : .fifo }
}

/// `accelgate hash-key`: prints the SHA-256 to put in a tenants file, reading the key
/// from stdin so it stays out of shell history and process listings.
struct HashKey: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "hash-key", abstract: "Print the api_key_sha256 entry for an API key read from stdin.")
  func run() throws {
    guard let key = readLine(strippingNewline: true), !key.isEmpty else { throw ValidationError("no key on stdin") }
    print(KeyHash.hex(of: key))
  }
}

/// `accelgate gen-key`: a new random API key and its hash.
struct GenKey: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "gen-key", abstract: "Generate a random API key; prints the key, then its api_key_sha256.")
  func run() throws {
    let key = KeyHash.generateKey()
    print("key:            \(key)")
    print("api_key_sha256: \(KeyHash.hex(of: key))")
  }
}
