internal import AccelABI
internal import AccelCoreEdge
public import AccelRequests
internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import AccelScheduler
internal import Foundation
internal import Synchronization
public import Logging
import Glibc

/// The whole gateway in one process: embedded device, driver, dispatcher, and the gRPC edge on the C core.
public final class AccelGateServer: Sendable {
  public let configuration: ServiceConfiguration
  /// The embedded device, or nil when a standalone daemon serves the queues.
  let device: EmulatedDevice?
  /// The standalone daemon, when one serves the queues.
  let external: ExternalDevice?
  let dispatcher: Dispatcher
  let directory: TenantDirectory
  let keyring: KeyringDirectory
  let draining = Draining()
  let metrics = GatewayMetrics()
  private let metricsServer = Mutex<MetricsServer?>(nil)
  /// Finishes when the drain grace has run out (see `shutdown`).
  private let graceExpired: AsyncStream<Void>
  private let graceExpiredContinuation: AsyncStream<Void>.Continuation
  private let drainStarted = Mutex<ContinuousClock.Instant?>(nil)
  /// The API on gRPC's C core, on `host:port`.
  private let edge: CoreServer
  /// The local lane: the API again on a Unix socket (the only listener that
  /// serves region spans), and its control socket.
  private let localEdge: CoreServer?
  private let localControl: LocalControlServer?
  /// Ends calls whose replies wait in the C core longer than the write timeout.
  private let replyWatchdog: ReplyWatchdog
  /// Where the local listener binds first (a private directory beside the
  /// socket path), to be renamed into place once its mode is 0660; nil: bound in place.
  private let localStaging: (directory: String, socket: String)?
  /// `serve`'s progress, for `listeningPort`: starting, listening (every
  /// socket at its path), or failed to publish the local socket.
  private let listening = Atomic<Int>(Listening.starting)
  private enum Listening {
    static let starting = 0
    static let ready = 1
    static let failed = 2
  }
  private let logger: Logger

  public init(configuration: ServiceConfiguration = .defaults, logger: Logger = Logger(label: "accelgate")) throws {
    self.configuration = configuration
    self.logger = logger
    (graceExpired, graceExpiredContinuation) = AsyncStream<Void>.makeStream()
    guard configuration.maxRequestBytes > 0, configuration.maxDecompressedBytes > 0 else {
      throw ConfigurationError("maxRequestBytes and maxDecompressedBytes must be positive")
    }
    // The largest job is a chained decrypt+decompress: sealed input, plaintext in
    // the middle buffer, decompressed output, plus the parameter block.
    let sealed = BufferSizing.compressBound(UInt64(configuration.maxRequestBytes)) + 64
    let worstJob = 2 * sealed + UInt64(max(configuration.maxRequestBytes, configuration.maxDecompressedBytes)) + 70_000
    guard worstJob <= configuration.device.dataPoolBytes else {
      throw ConfigurationError(
        "device data pool (\(configuration.device.dataPoolBytes) bytes) cannot hold the largest job (\(worstJob) bytes)")
    }
    let driver: DeviceDriver
    var driverConfiguration = DriverConfiguration.defaults
    driverConfiguration.completionTimeout = configuration.completionTimeout
    var startDegraded: String?
    if let address = configuration.deviceAddress {
      let fallback =
        configuration.softwareFallback
        ? FallbackDevice(configuration: configuration.device, driverConfiguration: driverConfiguration) : nil
      let external = ExternalDevice(
        address: address, queueCount: configuration.device.queueCount, weight: configuration.queueWeight,
        driverConfiguration: driverConfiguration, fallback: fallback, logger: logger)
      do {
        driver = try external.connect()
        logger.info("attached to device", metadata: ["device": "\(address)", "queues": "\(driver.queues.count)"])
      } catch let error where fallback != nil {
        // Start on the stand-in and attach when the device appears.
        driver = try fallback!.driver()
        startDegraded = "device \(address) unavailable at start (\(error)); serving from the software fallback"
      }
      self.external = external
      self.device = nil
    } else {
      let device = try EmulatedDevice(configuration: configuration.device)
      let log = logger
      device.setEventHandler { log.warning("device: \($0)") }
      device.start()
      driver = try DeviceDriver(
        queueFileDescriptors: (0..<device.queues.count).map { device.exportQueue($0) }, configuration: driverConfiguration)
      driver.regionHost = EmbeddedRegionHost(device: device)
      self.device = device
      self.external = nil
    }
    var dc = DispatcherConfiguration.defaults
    dc.maxQueuedJobs = configuration.maxQueuedJobs
    dc.inFlightPerQueue = configuration.inFlightPerQueue
    dc.inFlightBudget = configuration.inFlightBudget
    dc.maxBatch = configuration.maxBatch
    dc.defaultDeadline = configuration.defaultDeadline
    dc.scheduler = configuration.scheduler
    dc.verifyCompression = configuration.verifyCompression
    dc.maxQueuedBytes = configuration.maxQueuedPayloadBytes
    var tenantLimits = configuration.defaultTenantLimits
    tenantLimits.maxPayloadBytes = min(tenantLimits.maxPayloadBytes, configuration.maxRequestBytes)
    let directory = try TenantDirectory(path: configuration.tenantsFile, defaultLimits: tenantLimits)
    let smallest = driver.queues.map(\.poolCapacity).min() ?? 0
    guard smallest >= worstJob else {
      throw ConfigurationError(
        "the device's queue pools hold \(smallest) bytes but the largest job needs \(worstJob); lower --max-request-bytes or give the device a larger pool"
      )
    }
    if configuration.pooledPayloads {
      // Network lane: payloads wait staged in the top of each pool; the rest
      // always holds the largest job (docs/NETWORK_LANE.md, "Pool protection").
      dc.stagingZoneBytes = UInt64(Double(smallest) * min(1, max(0, configuration.stagingPoolFraction)))
      dc.largestJobBytes = worstJob
    }
    let dispatcher = Dispatcher(driver: driver, configuration: dc, tenants: directory.current.policies, logger: logger)
    let metrics = self.metrics
    dispatcher.setObserver { metrics.recordJob($0) }
    dispatcher.start()
    if let startDegraded { dispatcher.failover(to: driver, oldIsGone: false, reason: "start", degraded: startDegraded) }
    external?.watch(dispatcher)
    self.dispatcher = dispatcher
    self.directory = directory
    let keyring = try KeyringDirectory(path: configuration.keyringFile)
    self.keyring = keyring
    var service = AcceleratorService(
      dispatcher: dispatcher, configuration: configuration, device: device, keyring: keyring,
      nonceLedger: try NonceLedger(path: configuration.nonceStateFile), audit: try AuditLog(path: configuration.auditLogFile))
    service.draining = draining
    service.tenants = directory
    service.metrics = metrics
    let health = HealthService(dispatcher: dispatcher, device: device, draining: draining)
    // One bound for both listeners on the pool a tenant's unsent replies hold, and on how long they wait.
    let pins = ReplyPins(limit: Int(configuration.device.dataPoolBytes / 4))
    replyWatchdog = ReplyWatchdog(pins: pins, wait: configuration.streamWriteTimeout)
    metrics.observe(pins: pins)
    // The TCP listener's copy of the service serves no region spans (only the local socket does).
    let tcp: AcceleratorService
    if let path = configuration.localSocket, let control = configuration.effectiveLocalControlSocket {
      let registry = RegionRegistry(dispatcher: dispatcher, logger: logger, quotas: configuration.localQuotas)
      service.regions = registry
      metrics.observe(regions: registry)
      localControl = try LocalControlServer(path: control, registry: registry, directory: directory, logger: logger)
      unlink(path)
      let staging = try Self.stagingPath(for: path)
      localStaging = staging
      var tcpService = service
      tcpService.regions = nil
      tcpService.localLaneSocket = path
      tcp = tcpService
      // Same API; plaintext, since the socket never leaves the host.
      localEdge = try Self.makeEdge(
        configuration, address: "unix:\(staging?.socket ?? path)", tls: false, service: service, directory: directory,
        metrics: metrics, logger: logger, health: health, pins: pins)
    } else {
      localEdge = nil
      localControl = nil
      localStaging = nil
      tcp = service
    }
    edge = try Self.makeEdge(
      configuration, address: "\(configuration.host):\(configuration.port)", tls: true, service: tcp,
      directory: directory, metrics: metrics, logger: logger, health: health, pins: pins)
  }

  /// The API on gRPC's C core at `address` ("host:port" or "unix:/path"), with the configured TLS when `tls`.
  static func makeEdge(
    _ configuration: ServiceConfiguration, address: String, tls: Bool, service: AcceleratorService,
    directory: TenantDirectory, metrics: GatewayMetrics, logger: Logger, health: HealthService, pins: ReplyPins
  ) throws -> CoreServer {
    var core = CoreServerConfiguration()
    core.addresses = [address]
    core.maxReceiveMessageBytes = configuration.transportMaxRequestBytes
    core.maxConcurrentStreams = configuration.maxConcurrentStreams
    core.keepaliveTimeMilliseconds = Self.milliseconds(configuration.keepaliveTime)
    core.keepaliveTimeoutMilliseconds = Self.milliseconds(configuration.keepaliveTimeout)
    core.maxConnectionIdleMilliseconds = configuration.maxConnectionIdle.map(Self.milliseconds) ?? 0
    core.maxConnectionAgeMilliseconds = configuration.maxConnectionAge.map(Self.milliseconds) ?? 0
    core.maxConnectionAgeGraceMilliseconds = configuration.maxConnectionGrace.map(Self.milliseconds) ?? 0
    core.http2MaxFrameSize = configuration.http2MaxFrameSize
    core.http2StreamWindowBytes = configuration.http2TargetWindowSize
    if tls, let chain = configuration.tlsCertificateChain, let key = configuration.tlsPrivateKey {
      core.tls = CoreServerConfiguration.TLS(
        keyPEM: try String(contentsOfFile: key, encoding: .utf8),
        certificateChainPEM: try String(contentsOfFile: chain, encoding: .utf8),
        clientCAPEM: try configuration.tlsClientCA.map { try String(contentsOfFile: $0, encoding: .utf8) })
    }
    let edge = CoreEdgeService(
      service: service, directory: directory, health: health, reflection: try ReflectionService(), metrics: metrics,
      logger: logger, pins: pins)
    do {
      return try CoreServer(configuration: core, methods: edge.methods, unregistered: { edge.unregistered($0) })
    } catch {
      throw ConfigurationError("cannot listen on \(address): \(error)")
    }
  }

  /// A duration in whole milliseconds for the C core's settings (at least 1, at most Int32.max).
  static func milliseconds(_ d: Duration) -> Int {
    let ms = d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
    return Int(max(1, min(ms, Int64(Int32.max))))
  }

  /// A private (0700) directory beside `path` and a socket path in it, where the
  /// local listener binds before its mode is set and it is renamed to
  /// `path`: nobody can connect while the mode still follows the umask. nil
  /// when that path would not fit in a socket address (then it binds at `path`
  /// and is chmod-ed once listening).
  static func stagingPath(for path: String) throws -> (directory: String, socket: String)? {
    let slash = path.lastIndex(of: "/")
    let dir = slash.map { String(path[..<$0]) } ?? "."
    var template = Array("\(dir.isEmpty ? "/" : dir)/.agXXXXXX".utf8CString)
    guard template.count + 2 <= 108 else { return nil }
    guard let made = mkdtemp(&template) else {
      throw ConfigurationError("cannot create a directory beside the local socket \(path): \(String(cString: strerror(errno)))")
    }
    let directory = String(cString: made)
    return (directory, directory + "/s")
  }

  /// Once the local listener is bound: mode 0660 (owner and group may connect,
  /// whatever the umask; the process-wide umask is never changed), then the
  /// socket is renamed to its documented path.
  private func publishLocalSocket(path: String) throws {
    let bound = localStaging?.socket ?? path
    guard chmod(bound, 0o660) == 0 else {
      throw ConfigurationError("cannot chmod the local socket \(bound): \(String(cString: strerror(errno)))")
    }
    if let staging = localStaging {
      guard rename(staging.socket, path) == 0 else {
        throw ConfigurationError("cannot move the local socket to \(path): \(String(cString: strerror(errno)))")
      }
      rmdir(staging.directory)
    }
  }

  /// Serves until `shutdown()`; then stops the dispatcher, driver and device.
  public func serve() async throws {
    if let port = configuration.metricsPort {
      let (dispatcher, device, external, metrics) = (self.dispatcher, self.device, self.external, self.metrics)
      let server = try await MetricsServer(host: configuration.metricsHost, port: port) {
        metrics.scrape(dispatcher: dispatcher, device: device, fallback: external?.fallback?.device)
      }
      metricsServer.withLock { $0 = server }
    }
    defer {
      if let staging = localStaging {
        unlink(staging.socket)
        rmdir(staging.directory)
      }
      if localEdge != nil, let path = configuration.localSocket { unlink(path) }
      localControl?.stop()
      replyWatchdog.stop()
      external?.stop()
      dispatcher.shutdown()
      dispatcher.driver.stop()
      device?.stop()
    }
    edge.start()
    if let localEdge, let path = configuration.localSocket {
      localEdge.start()
      do { try publishLocalSocket(path: path) } catch {
        listening.store(Listening.failed, ordering: .releasing)
        await Self.onThread { [edge] in
          edge.shutdown(grace: .zero)
          localEdge.shutdown(grace: .zero)
        }
        throw error
      }
    }
    localControl?.start()
    replyWatchdog.start()
    listening.store(Listening.ready, ordering: .releasing)
    // Serves until both listeners have drained after `shutdown()`; if the grace
    // runs out first, what is left is cancelled.
    let (edges, expired) = ([edge] + (localEdge.map { [$0] } ?? []), graceExpired)
    await withTaskGroup(of: Void.self) { group in
      group.addTask {
        await withTaskCancellationHandler {
          for e in edges { await e.drained() }
        } onCancel: {
          for e in edges { e.cancelAll() }
        }
      }
      group.addTask { for await _ in expired { return } }
      _ = await group.next()
      group.cancelAll()
    }
    // Their calls had the same grace; whatever is left now is cancelled.
    await Self.onThread { for e in edges { e.shutdown(grace: .zero) } }
    if let started = drainStarted.withLock({ $0 }) {
      logger.notice("drained", metadata: ["seconds": "\(ContinuousClock.now - started)"])
    }
    if let m = metricsServer.withLock({ $0 }) { await m.close() }
  }

  /// Runs blocking work on a thread of its own, so no task waits on it.
  static func onThread(_ work: @escaping @Sendable () -> Void) async {
    await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
      Thread {
        work()
        done.resume()
      }.start()
    }
  }

  /// The port `/metrics` is served on, once listening; nil when metrics are off.
  public var metricsPort: Int? { metricsServer.withLock { $0?.port } }

  /// Renders the metrics as a scrape would (for tests and tools).
  public func renderMetrics() -> String {
    String(decoding: metrics.scrape(dispatcher: dispatcher, device: device, fallback: external?.fallback?.device), as: UTF8.self)
  }

  /// The bound port, once listening (useful with port 0).
  /// Waits for the local socket too, when there is one, so a listening line
  /// printed after it means both are ready.
  public func listeningPort() async throws -> Int? {
    while true {
      switch listening.load(ordering: .acquiring) {
      case Listening.ready: return edge.ports.first
      case Listening.failed: throw ConfigurationError("the local socket \(configuration.localSocket ?? "") could not be published")
      default: try await Task.sleep(for: .milliseconds(5))
      }
    }
  }

  /// Re-reads the tenants file (SIGHUP). Calls in flight are unaffected; on error
  /// the previous tenants stay in force and the error is returned.
  public func reloadTenants() -> Result<Int, ConfigurationError> {
    do {
      let table = try directory.reload()
      dispatcher.updateTenants(table.policies)
      try keyring.reload()
      return .success(table.policies.count)
    } catch let e as ConfigurationError {
      return .failure(e)
    } catch {
      return .failure(ConfigurationError("\(error)"))
    }
  }

  /// Turns health NOT_SERVING, stops accepting calls and lets in-flight calls
  /// finish, for at most `drainGrace`; then the server stops anyway.
  public func shutdown() {
    let first = drainStarted.withLock { s -> Bool in
      guard s == nil else { return false }
      s = .now
      return true
    }
    guard first else { return }
    draining.begin()
    logger.notice("draining", metadata: ["grace": "\(configuration.drainGrace)", "delay": "\(configuration.drainDelay)"])
    let (grace, delay, expired) = (configuration.drainGrace, configuration.drainDelay, graceExpiredContinuation)
    let edges = [edge] + (localEdge.map { [$0] } ?? [])
    Task.detached {
      // Health is NOT_SERVING from here on; new calls are still served for `delay`.
      if delay > .zero { try? await Task.sleep(for: delay) }
      // No new calls on either listener; open ones finish within the grace.
      await Self.onThread { for e in edges { e.beginShutdown() } }
      try? await Task.sleep(for: grace)
      expired.yield()
    }
  }
}
