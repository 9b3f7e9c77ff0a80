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
    subcommands: [Serve.self, Device.self, CheckConfig.self, HashKey.self, GenKey.self],
    defaultSubcommand: Serve.self
  )
}

struct Serve: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    abstract: "Serve gRPC with the embedded emulated device (or a standalone one).",
    discussion: """
      Settings come from the defaults, then --config FILE (YAML), then ACCELGATE_* environment \
      variables (ACCELGATE_LISTEN_PORT for listen.port), then these flags. See docs/CONFIG.md.
      """)

  @Option(help: "Main configuration file (YAML or JSON); `accelgate check-config FILE` validates it.")
  var config: String?
  @Option(help: "Address to listen on [127.0.0.1].") var host: String?
  @Option(help: "Port to listen on; 0 picks a free port [50051].") var port: String?
  @Option(help: "Largest request payload, in bytes [4194304].") var maxRequestBytes: String?
  @Option(help: "Largest decompressed output, in bytes [4194304].") var maxDecompressedBytes: String?
  @Option(help: "Jobs allowed to wait for the device [1024].") var maxQueuedJobs: String?
  @Option(help: "Descriptors in flight per hardware queue [8].") var inFlightPerQueue: String?
  @Option(help: "Estimated device time kept in flight per hardware queue, in microseconds [2000].")
  var inFlightBudgetUs: String?
  @Option(help: "Concurrent streams per HTTP/2 connection [256].") var maxConcurrentStreams: String?
  @Option(help: "Most descriptors per doorbell [16].") var maxBatch: String?
  @Option(help: "Deadline in milliseconds for calls that set none [30000].") var defaultDeadlineMs: String?
  @Option(help: "Hardware queues (also how many to ask a standalone device for) [2].") var queues: String?
  @Option(help: "Engine threads on the embedded device [2].") var engines: String?
  @Option(help: "Submission ring entries per queue, a power of two [256].") var sqEntries: String?
  @Option(help: "Data pool per queue, in MiB [64].") var poolMib: String?
  @Option(help: "Per-engine throughput cap in MB/s; 0 = uncapped [0].") var engineCapMbps: String?
  @Option(help: "Engine idle spin before parking, in microseconds [50].") var idleSpinUs: String?
  @Option(help: "Tenants file (YAML); without it one open 'default' tenant serves every call.") var tenants: String?
  @Option(help: "Standalone device, e.g. unix:///run/accelgate/dev0.sock [embedded].") var device: String?
  @Option(help: "Arbitration weight of this gateway's queues on a shared device [1].") var queueWeight: String?
  @Option(help: "Keyring file (YAML) of named, versioned keys per tenant; reloaded on SIGHUP.") var keyring: String?
  @Option(help: "File persisting per-key-version nonce counts (JSON).") var nonceState: String?
  @Option(help: "Audit log of key operations (JSON lines).") var auditLog: String?
  @Option(help: "Scheduler: fair (weighted fair queuing by device time) or fifo [fair].") var scheduler: String?
  @Option(help: "Default per-tenant limit on queued jobs [256].") var tenantMaxQueuedJobs: String?
  @Option(help: "Default per-tenant limit on queued payload bytes [268435456].") var tenantMaxQueuedBytes: String?
  @Option(help: "Log level: trace, debug, info, notice, warning, error [info].") var logLevel: String?
  @Option(help: "Log format: text or json (one object per line) [text].") var logFormat: String?
  @Flag(inversion: .prefixedNo, help: "With --device: serve from an embedded software device while it is down [off].")
  var softwareFallback: Bool?
  @Flag(inversion: .prefixedNo, help: "Compress-and-verify on the device [off].") var verifyCompression: Bool?
  @Flag(
    inversion: .prefixedNo,
    help: "Network lane: decode payloads straight into the device pool and write results straight from it [on].")
  var pooledPayloads: Bool?
  @Option(help: "Network lane: fraction of each queue pool where payloads may wait staged [0.5].")
  var stagingPoolFraction: String?
  @Option(help: "Milliseconds without a completion before a job is declared lost [5000].") var completionTimeoutMs: String?
  @Option(help: "Queue errors within the isolation window that isolate the device [16].") var isolationThreshold: String?
  @Option(help: "Isolation window, in milliseconds [10000].") var isolationWindowMs: String?
  @Option(help: "Milliseconds an isolation lasts; 0 = until restart [30000].") var isolationCooldownMs: String?
  @Option(help: "Inject faults (tests, drills): MODE[,every=N][,latency-ms=M][,queue=Q].") var injectFault: String?
  @Option(help: "Local lane: also serve gRPC on this Unix socket, with memory registration on PATH.ctl [off].")
  var localSocket: String?
  @Option(help: "Local lane control socket [--local-socket + .ctl].") var localControlSocket: String?
  @Option(help: "Address for the Prometheus /metrics endpoint [127.0.0.1].") var metricsHost: String?
  @Option(help: "Port for /metrics; 0 picks a free port [9464].") var metricsPort: String?
  @Flag(help: "Serve no /metrics endpoint.") var noMetrics = false
  @Option(help: "On SIGTERM, milliseconds calls in flight get to finish [30000].") var drainGraceMs: String?
  @Option(help: "On SIGTERM, milliseconds of NOT_SERVING before new calls are refused [0].") var drainDelayMs: String?
  @Option(help: "Payload bytes all waiting jobs may hold; 0 = unbounded [1073741824].") var maxQueuedPayloadBytes: String?
  @Option(help: "End a stream whose client accepts no output for this many milliseconds [30000].")
  var streamWriteTimeoutMs: String?
  @Option(help: "End a stream whose client sends nothing for this many milliseconds; 0 = never [60000].")
  var streamIdleTimeoutMs: String?
  @Option(help: "Close connections idle this many milliseconds; 0 = never [1800000].") var maxConnectionIdleMs: String?
  @Option(help: "Close connections older than this many milliseconds, gracefully; 0 = never [0].")
  var maxConnectionAgeMs: String?
  @Option(help: "Ping idle clients every this many milliseconds [7200000].") var keepaliveMs: String?
  @Option(help: "TLS for the gRPC port: PEM certificate chain (with --tls-key).") var tlsCert: String?
  @Option(help: "TLS private key, PEM.") var tlsKey: String?
  @Option(help: "mTLS: PEM CA bundle that client certificates must chain to.") var tlsClientCa: String?

  /// Flag values by setting path (see ConfigFile), in the order they apply.
  var overrides: [(path: String, value: String)] {
    let all: [(String, String?)] = [
      ("listen.host", host), ("listen.port", port), ("listen.max_concurrent_streams", maxConcurrentStreams),
      ("limits.max_request_bytes", maxRequestBytes), ("limits.max_decompressed_bytes", maxDecompressedBytes),
      ("limits.max_queued_jobs", maxQueuedJobs), ("limits.default_deadline_ms", defaultDeadlineMs),
      ("limits.drain_grace_ms", drainGraceMs), ("limits.stream_write_timeout_ms", streamWriteTimeoutMs), ("limits.stream_idle_timeout_ms", streamIdleTimeoutMs), ("limits.drain_delay_ms", drainDelayMs), ("limits.tenant_max_queued_jobs", tenantMaxQueuedJobs),
      ("limits.tenant_max_queued_bytes", tenantMaxQueuedBytes), ("scheduler.kind", scheduler),
      ("scheduler.in_flight_per_queue", inFlightPerQueue), ("scheduler.in_flight_budget_us", inFlightBudgetUs),
      ("scheduler.max_batch", maxBatch), ("device.address", device), ("device.queue_weight", queueWeight),
      ("device.software_fallback", softwareFallback.map { "\($0)" }),
      ("device.verify_compression", verifyCompression.map { "\($0)" }),
      ("listen.pooled_payloads", pooledPayloads.map { "\($0)" }),
      ("listen.staging_pool_fraction", stagingPoolFraction),
      ("device.completion_timeout_ms", completionTimeoutMs), ("device.queues", queues), ("device.engines", engines),
      ("device.sq_entries", sqEntries), ("device.pool_mib", poolMib), ("device.engine_cap_mbps", engineCapMbps),
      ("device.idle_spin_us", idleSpinUs), ("device.isolation.threshold", isolationThreshold),
      ("device.isolation.window_ms", isolationWindowMs), ("device.isolation.cooldown_ms", isolationCooldownMs),
      ("device.inject_fault", injectFault), ("files.tenants", tenants), ("files.keyring", keyring),
      ("files.nonce_state", nonceState), ("files.audit_log", auditLog), ("log.level", logLevel),
      ("log.format", logFormat), ("local.socket", localSocket), ("local.control_socket", localControlSocket),
      ("metrics.host", metricsHost), ("metrics.port", metricsPort),
      ("metrics.enabled", noMetrics ? "false" : nil), ("tls.certificate", tlsCert), ("tls.private_key", tlsKey),
      ("tls.client_ca", tlsClientCa), ("limits.max_queued_payload_bytes", maxQueuedPayloadBytes),
      ("connection.max_idle_ms", maxConnectionIdleMs), ("connection.max_age_ms", maxConnectionAgeMs),
      ("connection.keepalive_ms", keepaliveMs),
    ]
    return all.compactMap { path, value in value.map { (path, $0) } }
  }

  func run() async throws {
    // Flat memory under long streams (see accel_sys.h); ACCELGATE_DEFAULT_MALLOC=1 opts out.
    if ProcessInfo.processInfo.environment["ACCELGATE_DEFAULT_MALLOC"] == nil { _ = accel_tune_malloc() }
    var config = ServiceConfiguration.defaults
    do throws(ConfigFile.Issues) {
      if let file = self.config { try ConfigFile.apply(file: file, to: &config) }
      try ConfigFile.apply(environment: ProcessInfo.processInfo.environment, to: &config)
      try ConfigFile.apply(overrides: overrides, to: &config)
    } catch {
      throw ValidationError("invalid configuration:\n\(error)")
    }
    if let problem = config.consistencyProblem { throw ValidationError("invalid configuration: \(problem)") }
    let logger = LogSetup.bootstrap(level: config.logLevel, format: config.logFormat)
    logger.info(
      "effective configuration",
      metadata: .init(uniqueKeysWithValues: ConfigFile.render(config).map { ($0.0, Logger.MetadataValue.string($0.1)) }))
    let (host, queues, engines) = (config.host, config.device.queueCount, config.device.engineCount)
    let (maxRequestBytes, scheduler, tenants) = (config.maxRequestBytes, config.scheduler, config.tenantsFile)
    let metricsHost = config.metricsHost
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
  @Option(help: "A control frame begun must be complete within this (ms), or the connection is closed.")
  var frameTimeoutMs = 5000
  @Option(help: "Control connections kept before their hello; accepting one more closes the oldest.")
  var maxUnauthenticated = 64
  @Option(help: "Queues one gateway (control connection) may hold.") var maxQueuesPerPeer = 32
  @Option(help: "Queue memory one gateway may hold, in MiB (0 = only the device budget).") var maxPeerMib = 0
  @Option(help: "Highest arbitration weight a gateway may ask for.") var maxQueueWeight: UInt32 = 64

  func validate() throws {
    guard (1...127).contains(maxQueuesPerPeer) else { throw ValidationError("--max-queues-per-peer must be 1...127") }
    guard maxPeerMib >= 0 else { throw ValidationError("--max-peer-mib must be 0 or more") }
    guard (1...10_000).contains(maxQueueWeight) else { throw ValidationError("--max-queue-weight must be 1...10000") }
    guard (100...600_000).contains(frameTimeoutMs) else { throw ValidationError("--frame-timeout-ms must be 100...600000") }
    guard (1...100_000).contains(maxUnauthenticated) else { throw ValidationError("--max-unauthenticated must be 1...100000") }
  }

  func run() throws {
    if ProcessInfo.processInfo.environment["ACCELGATE_DEFAULT_MALLOC"] == nil { _ = accel_tune_malloc() }
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
    config.frameTimeout = .milliseconds(frameTimeoutMs)
    config.maxUnauthenticated = maxUnauthenticated
    config.maxQueuesPerPeer = maxQueuesPerPeer
    config.maxRegionBytesPerPeer = maxPeerMib > 0 ? UInt64(maxPeerMib) << 20 : nil
    config.maxQueueWeight = maxQueueWeight
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
      Thread.current.name = "accel-signals"
      while true {
        let sig = accel_signal_pipe_wait(fd)
        if sig < 0 { return }
        if sig == SIGHUP { onHangup() } else { onTerminate() }
      }
    }
    t.start()
  }
}

enum SchedulerArgument: String, ExpressibleByArgument, CaseIterable {
  case fair, fifo
  var kind: SchedulerKind { self == .fair ? .fair : .fifo }
}

/// `accelgate check-config FILE`: validates a main configuration file, reporting
/// every problem as `FILE:LINE:COLUMN: setting: message`; on success prints the
/// effective configuration (file over defaults; environment and flags are not applied).
struct CheckConfig: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "check-config", abstract: "Validate a configuration file; print the effective settings.")
  @Argument(help: "The YAML or JSON file.") var file: String
  @Flag(help: "Also apply ACCELGATE_* environment variables.") var environment = false

  func run() throws {
    var config = ServiceConfiguration.defaults
    do throws(ConfigFile.Issues) {
      try ConfigFile.apply(file: file, to: &config)
      if environment { try ConfigFile.apply(environment: ProcessInfo.processInfo.environment, to: &config) }
    } catch {
      FileHandle.standardError.write(Data("\(error)\n".utf8))
      throw ExitCode(1)
    }
    if let problem = config.consistencyProblem {
      FileHandle.standardError.write(Data("\(file): \(problem)\n".utf8))
      throw ExitCode(1)
    }
    for (path, value) in ConfigFile.render(config) { print("\(path): \(value)") }
    FileHandle.standardError.write(Data("\(file): ok\n".utf8))
  }
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
