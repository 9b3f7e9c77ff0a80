internal import AccelABI
internal import AccelCoreEdge
public import AccelRequests
internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import AccelHTTP2
internal import AccelScheduler
internal import GRPCCore
internal import GRPCNIOTransportHTTP2
internal import Foundation
internal import Synchronization
public import Logging
import Glibc

/// The whole gateway in one process: embedded device, driver, dispatcher and gRPC server.
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
  /// The grpc-swift listener on `host:port` (nil when the C core serves it: `edge == .core`).
  private let server: GRPCServer<HTTP2ServerTransport.Posix>?
  /// The local lane's gRPC listener on a Unix socket, and its control socket.
  private let localServer: GRPCServer<HTTP2ServerTransport.Posix>?
  private let localControl: LocalControlServer?
  /// The API on gRPC's C core: on `host:port` when `edge == .core`, and on `coreEdgePort` when set.
  private let coreEdge: CoreServer?
  /// Where the local gRPC listener binds first (a private directory beside the
  /// socket path), to be renamed into place once its mode is 0660; nil: bound in place.
  private let localStaging: (directory: String, socket: String)?
  /// 1 once the local gRPC socket is at its path with mode 0660 (or there is
  /// none), 2 if that failed, 0 until then.
  private let localPublished = Atomic<Int>(0)
  /// Set once `serve` has started the C-core edge (and /metrics before it).
  private let coreStarted = Atomic<Bool>(false)
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
    // The network lane re-registers four methods after the generated service (the router keeps the last).
    func lane(_ service: AcceleratorService) -> [any RegistrableRPCService] {
      guard configuration.pooledPayloads else { return [] }
      return [NetworkLaneService(service: service, lane: NetworkLane(dispatcher: dispatcher, metrics: metrics))]
    }
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
      // Same services and interceptors; plaintext, since the socket never leaves the host.
      localServer = GRPCServer(
        transport: .http2NIOPosix(
          address: .unixDomainSocket(path: staging?.socket ?? path), transportSecurity: .plaintext,
          config: .defaults {
            $0.rpc.maxRequestPayloadSize = configuration.transportMaxRequestBytes
            $0.http2.maxFrameSize = configuration.http2MaxFrameSize
            $0.http2.targetWindowSize = configuration.http2TargetWindowSize
            $0.http2.maxConcurrentStreams = configuration.maxConcurrentStreams
            $0.channelDebuggingCallbacks.onAcceptHTTP2Stream = ServerStreamHandlers.install
          }),
        services: [service as any RegistrableRPCService] + lane(service) + [
          HealthService(dispatcher: dispatcher, device: self.device, draining: draining), try ReflectionService(),
        ],
        interceptors: [AuthInterceptor(directory: directory, metrics: metrics), MetricsInterceptor(metrics: metrics, logger: logger)]
      )
    } else {
      localServer = nil
      localControl = nil
      localStaging = nil
      localPublished.store(1, ordering: .releasing)
      tcp = service
    }
    coreEdge = try Self.makeCoreEdge(
      configuration, service: tcp, directory: directory, metrics: metrics, logger: logger,
      health: HealthService(dispatcher: dispatcher, device: device, draining: draining))
    guard configuration.edge == .swift else {
      server = nil
      return
    }
    self.server = GRPCServer(
      transport: .http2NIOPosix(
        address: .ipv4(host: configuration.host, port: configuration.port),
        transportSecurity: Self.transportSecurity(configuration),
        config: .defaults {
          $0.rpc.maxRequestPayloadSize = configuration.transportMaxRequestBytes
          $0.http2.maxFrameSize = configuration.http2MaxFrameSize
          $0.http2.targetWindowSize = configuration.http2TargetWindowSize
          $0.http2.maxConcurrentStreams = configuration.maxConcurrentStreams
          $0.connection.maxIdleTime = configuration.maxConnectionIdle
          $0.connection.maxAge = configuration.maxConnectionAge
          $0.connection.maxGraceTime = configuration.maxConnectionGrace
          $0.connection.keepalive.time = configuration.keepaliveTime
          $0.connection.keepalive.timeout = configuration.keepaliveTimeout
          // Not for debugging: the only hook for the flush-deadlock workaround (AccelHTTP2).
          $0.channelDebuggingCallbacks.onAcceptHTTP2Stream = ServerStreamHandlers.install
        }
      ),
      services: [tcp as any RegistrableRPCService] + lane(tcp) + [
        HealthService(dispatcher: dispatcher, device: self.device, draining: draining), try ReflectionService(),
      ],
      interceptors: [AuthInterceptor(directory: directory, metrics: metrics), MetricsInterceptor(metrics: metrics, logger: logger)]
    )
  }

  /// The C-core edge: on `host:port` when it is the edge, and on `coreEdgePort` when that is set; nil for neither.
  static func makeCoreEdge(
    _ configuration: ServiceConfiguration, service: AcceleratorService, directory: TenantDirectory,
    metrics: GatewayMetrics, logger: Logger, health: HealthService
  ) throws -> CoreServer? {
    var core = CoreServerConfiguration()
    core.addresses =
      (configuration.edge == .core ? ["\(configuration.host):\(configuration.port)"] : [])
      + (configuration.coreEdgePort.map { ["\(configuration.host):\($0)"] } ?? [])
    guard !core.addresses.isEmpty else { return nil }
    core.maxReceiveMessageBytes = configuration.transportMaxRequestBytes
    core.maxConcurrentStreams = configuration.maxConcurrentStreams
    core.keepaliveTimeMilliseconds = Self.milliseconds(configuration.keepaliveTime)
    core.keepaliveTimeoutMilliseconds = Self.milliseconds(configuration.keepaliveTimeout)
    core.maxConnectionIdleMilliseconds = configuration.maxConnectionIdle.map(Self.milliseconds) ?? 0
    core.maxConnectionAgeMilliseconds = configuration.maxConnectionAge.map(Self.milliseconds) ?? 0
    core.maxConnectionAgeGraceMilliseconds = configuration.maxConnectionGrace.map(Self.milliseconds) ?? 0
    if let chain = configuration.tlsCertificateChain, let key = configuration.tlsPrivateKey {
      core.tls = CoreServerConfiguration.TLS(
        keyPEM: try String(contentsOfFile: key, encoding: .utf8),
        certificateChainPEM: try String(contentsOfFile: chain, encoding: .utf8),
        clientCAPEM: try configuration.tlsClientCA.map { try String(contentsOfFile: $0, encoding: .utf8) })
    }
    let edge = CoreEdgeService(
      service: service, directory: directory, health: health, reflection: try ReflectionService(), metrics: metrics,
      logger: logger, pins: ReplyPins(limit: Int(configuration.device.dataPoolBytes / 4)))
    do {
      return try CoreServer(configuration: core, methods: edge.methods, unregistered: { edge.unregistered($0) })
    } catch {
      throw ConfigurationError("cannot serve gRPC's C core on \(core.addresses.joined(separator: ", ")): \(error)")
    }
  }

  /// A duration in whole milliseconds for the C core's settings (at least 1, at most Int32.max).
  static func milliseconds(_ d: Duration) -> Int {
    let ms = d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
    return Int(max(1, min(ms, Int64(Int32.max))))
  }

  /// A private (0700) directory beside `path` and a socket path in it, where the
  /// local gRPC listener binds before its mode is set and it is renamed to
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
  private func publishLocalSocket(_ local: GRPCServer<HTTP2ServerTransport.Posix>, path: String) async throws {
    _ = try await local.listeningAddress
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
    localPublished.store(1, ordering: .releasing)
  }

  /// Plaintext, TLS, or mTLS (client certificates required and verified against
  /// `tlsClientCA`; host names are not checked, as clients have none to check).
  static func transportSecurity(_ c: ServiceConfiguration) -> HTTP2ServerTransport.Posix.TransportSecurity {
    guard let chain = c.tlsCertificateChain, let key = c.tlsPrivateKey else { return .plaintext }
    let certs: [TLSConfig.CertificateSource] = [.file(path: chain, format: .pem)]
    let privateKey = TLSConfig.PrivateKeySource.file(path: key, format: .pem)
    guard let ca = c.tlsClientCA else { return .tls(certificateChain: certs, privateKey: privateKey) }
    return .mTLS(certificateChain: certs, privateKey: privateKey) {
      $0.trustRoots = .certificates([.file(path: ca, format: .pem)])
      $0.clientCertificateVerification = .noHostnameVerification
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
      localControl?.stop()
      external?.stop()
      dispatcher.shutdown()
      dispatcher.driver.stop()
      device?.stop()
    }
    coreEdge?.start()
    coreStarted.store(true, ordering: .releasing)
    let served: Result<Void, any Error>
    do {
      // The server returns once every call has finished after a graceful
      // shutdown; if the grace runs out first, cancelling it ends the rest.
      let (server, expired) = (self.server, graceExpired)
      let local = localServer
      localControl?.start()
      try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask {
          // Both listeners serve until the TCP one has drained.
          try await withThrowingTaskGroup(of: Void.self) { both in
            both.addTask {
              if let server {
                try await server.serve()
              } else if let core = self.coreEdge {
                // Serves until drained; cancelled when the grace runs out, it ends what is left.
                await withTaskCancellationHandler { await core.drained() } onCancel: { core.cancelAll() }
              }
            }
            if let local, let path = self.configuration.localSocket {
              both.addTask {
                try await withThrowingTaskGroup(of: Void.self) { listener in
                  listener.addTask { try await local.serve() }
                  do { try await self.publishLocalSocket(local, path: path) } catch {
                    self.localPublished.store(2, ordering: .releasing)
                    listener.cancelAll()
                    throw error
                  }
                  try await listener.waitForAll()
                }
              }
            }
            _ = try await both.next()
            local?.beginGracefulShutdown()
            try await both.waitForAll()
          }
        }
        group.addTask {
          for await _ in expired { return }
          try await Task.sleep(for: .seconds(86_400 * 365))  // never expired: wait to be cancelled
          throw CancellationError()
        }
        _ = try await group.next()
        group.cancelAll()
      }
      served = .success(())
    } catch is CancellationError {
      served = .success(())
    } catch {
      served = .failure(error)
    }
    if let coreEdge {
      // Its calls had the same grace; whatever is left now is cancelled.
      await Self.onThread { coreEdge.shutdown(grace: .zero) }
    }
    if let started = drainStarted.withLock({ $0 }) {
      logger.notice("drained", metadata: ["seconds": "\(ContinuousClock.now - started)"])
    }
    if let m = metricsServer.withLock({ $0 }) { await m.close() }
    try served.get()
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

  /// The C-core edge's extra port (`coreEdgePort`), when it serves one.
  public var coreEdgePort: Int? { configuration.coreEdgePort == nil ? nil : coreEdge?.ports.last }

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
    let port: Int?
    if let server {
      port = try await server.listeningAddress?.ipv4?.port
    } else {
      while !coreStarted.load(ordering: .acquiring) { try await Task.sleep(for: .milliseconds(5)) }
      port = coreEdge?.ports.first
    }
    while true {
      switch localPublished.load(ordering: .acquiring) {
      case 1: return port
      case 2: throw ConfigurationError("the local socket \(configuration.localSocket ?? "") could not be published")
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
    let (server, localServer, coreEdge) = (self.server, self.localServer, self.coreEdge)
    Task.detached {
      // Health is NOT_SERVING from here on; new calls are still served for `delay`.
      if delay > .zero { try? await Task.sleep(for: delay) }
      server?.beginGracefulShutdown()
      localServer?.beginGracefulShutdown()
      // The C-core edge drains alongside: no new calls, open ones finish within the grace.
      if let coreEdge { await Self.onThread { coreEdge.beginShutdown() } }
      try? await Task.sleep(for: grace)
      expired.yield()
    }
  }
}
