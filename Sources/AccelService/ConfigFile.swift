internal import AccelDevice
internal import AccelRequests
internal import AccelScheduler
internal import Foundation
internal import Yams

/// The main configuration file (YAML; JSON is valid YAML), environment
/// variables and command-line flags, applied in that order over the defaults.
///
/// Every setting has one dotted path (`listen.port`, `device.isolation.threshold`),
/// used in the file, in the environment (`ACCELGATE_LISTEN_PORT`) and in error
/// messages. Secrets never live here: the tenants file and the keyring are
/// separate files the main file names (`files.tenants`, `files.keyring`).
/// The format is documented in docs/CONFIG.md.
public enum ConfigFile {
  /// One problem, with where it is.
  public struct Issue: Error, CustomStringConvertible, Equatable {
    public var file: String
    public var line: Int?
    public var column: Int?
    public var path: String
    public var message: String
    public var description: String {
      let place = line.map { ":\($0):\(column ?? 1)" } ?? ""
      return "\(file)\(place): \(path.isEmpty ? "" : path + ": ")\(message)"
    }
  }

  /// All problems found in one file (it is checked whole, not to the first error).
  public struct Issues: Error, CustomStringConvertible {
    public var issues: [Issue]
    public var description: String { issues.map(\.description).joined(separator: "\n") }
  }

  /// A value as the file, environment or flags gave it.
  enum Value {
    case scalar(String, tag: Tag)
    enum Tag { case plain, quoted }
  }

  struct Field: Sendable {
    let path: String
    let help: String
    let apply: @Sendable (String, inout ServiceConfiguration) -> String?  // nil = ok, else the error
  }

  // MARK: schema

  static func int(_ path: String, _ range: ClosedRange<Int>, _ help: String, _ set: @escaping @Sendable (inout ServiceConfiguration, Int) -> Void) -> Field {
    Field(path: path, help: help) { text, c in
      guard let v = Int(text.replacingOccurrences(of: "_", with: "")) else { return "expected an integer, got '\(text)'" }
      guard range.contains(v) else { return "must be \(range.lowerBound)...\(range.upperBound), got \(v)" }
      set(&c, v)
      return nil
    }
  }

  static func double(_ path: String, _ range: ClosedRange<Double>, _ help: String, _ set: @escaping @Sendable (inout ServiceConfiguration, Double) -> Void) -> Field {
    Field(path: path, help: help) { text, c in
      guard let v = Double(text) else { return "expected a number, got '\(text)'" }
      guard range.contains(v) else { return "must be \(range.lowerBound)...\(range.upperBound), got \(v)" }
      set(&c, v)
      return nil
    }
  }

  static func bool(_ path: String, _ help: String, _ set: @escaping @Sendable (inout ServiceConfiguration, Bool) -> Void) -> Field {
    Field(path: path, help: help) { text, c in
      switch text.lowercased() {
      case "true", "yes", "on", "1": set(&c, true)
      case "false", "no", "off", "0": set(&c, false)
      default: return "expected true or false, got '\(text)'"
      }
      return nil
    }
  }

  static func string(_ path: String, _ help: String, allowed: [String]? = nil, _ set: @escaping @Sendable (inout ServiceConfiguration, String) -> String?) -> Field {
    Field(path: path, help: help) { text, c in
      if let allowed, !allowed.contains(text) { return "must be one of \(allowed.joined(separator: ", ")), got '\(text)'" }
      return set(&c, text)
    }
  }

  static let mib = 1 << 20

  /// Every setting, in the order docs/CONFIG.md lists them.
  static let fields: [Field] = [
    string("listen.host", "gRPC listen address") { c, v in c.host = v; return nil },
    int("listen.port", 0...65535, "gRPC port (0 picks one)") { $0.port = $1 },
    int("listen.max_concurrent_streams", 1...65536, "HTTP/2 streams per connection") { $0.maxConcurrentStreams = $1 },
    int("listen.http2_window_bytes", 65535...(16 << 20), "each stream's initial HTTP/2 flow-control window (the C core grows it by BDP probing)") {
      $0.http2TargetWindowSize = $1
    },
    bool("listen.pooled_payloads", "network lane: payloads decoded into / written from the device pool (docs/NETWORK_LANE.md)") {
      $0.pooledPayloads = $1
    },
    double("listen.staging_pool_fraction", 0...1, "network lane: share of each queue pool for staged payloads") {
      $0.stagingPoolFraction = $1
    },
    string("local.socket", "Unix socket for local-lane gRPC (empty = off)") { c, v in c.localSocket = v.isEmpty ? nil : v; return nil },
    string("local.control_socket", "local-lane control socket [local.socket + .ctl]") { c, v in
      c.localControlSocket = v.isEmpty ? nil : v
      return nil
    },
    int("local.tenant_max_regions", 1...4096, "regions one tenant may hold") { $0.localQuotas.tenantMaxRegions = $1 },
    int("local.tenant_max_region_bytes", 1...(1 << 50), "bytes of regions one tenant may hold") {
      $0.localQuotas.tenantMaxRegionBytes = UInt64($1)
    },
    int("local.tenant_max_descriptors", 1...1_000_000, "descriptors held for one tenant's regions (1 + queues each)") {
      $0.localQuotas.tenantMaxDescriptors = $1
    },
    int("local.tenant_max_connections", 1...100_000, "authenticated control connections per tenant") {
      $0.localQuotas.tenantMaxConnections = $1
    },
    int("local.connection_max_regions", 1...4096, "regions one control connection may hold") {
      $0.localQuotas.connectionMaxRegions = $1
    },
    int("local.connection_max_region_bytes", 1...(1 << 50), "bytes of regions one control connection may hold") {
      $0.localQuotas.connectionMaxRegionBytes = UInt64($1)
    },
    int("local.connection_max_descriptors", 1...1_000_000, "descriptors held for one connection's regions") {
      $0.localQuotas.connectionMaxDescriptors = $1
    },
    int("local.max_unauthenticated_connections", 1...100_000, "control connections kept before a valid API key (oldest closed past it)") {
      $0.localQuotas.maxUnauthenticatedConnections = $1
    },
    int("local.frame_timeout_ms", 100...600_000, "a control frame begun must be complete within this") {
      $0.localQuotas.frameTimeout = .milliseconds($1)
    },
    int("local.descriptor_reserve", 0...1_000_000, "descriptors kept free below RLIMIT_NOFILE (registrations refused past it)") {
      $0.localQuotas.descriptorReserve = $1
    },
    bool("metrics.enabled", "serve /metrics") { c, on in c.metricsPort = on ? (c.metricsPort ?? 9464) : nil },
    string("metrics.host", "metrics listen address") { c, v in c.metricsHost = v; return nil },
    int("metrics.port", 0...65535, "metrics port (0 picks one)") { c, v in if c.metricsPort != nil { c.metricsPort = v } },
    int("limits.max_request_bytes", 1...(1 << 30), "largest request payload") { $0.maxRequestBytes = $1 },
    int("limits.max_decompressed_bytes", 1...(1 << 30), "decompression output cap") { $0.maxDecompressedBytes = $1 },
    int("limits.max_queued_jobs", 1...1_000_000, "jobs waiting for the device, all tenants") { $0.maxQueuedJobs = $1 },
    int("limits.default_deadline_ms", 1...86_400_000, "deadline for calls without one") { $0.defaultDeadline = .milliseconds($1) },
    int("limits.drain_grace_ms", 0...3_600_000, "time calls get to finish on SIGTERM") { $0.drainGrace = .milliseconds($1) },
    int("limits.drain_delay_ms", 0...600_000, "NOT_SERVING before refusing new calls on SIGTERM") {
      $0.drainDelay = .milliseconds($1)
    },
    int("limits.stream_write_timeout_ms", 100...3_600_000, "end a stream, or a unary call's reply from the pool, that the client accepts no output of this long") {
      $0.streamWriteTimeout = .milliseconds($1)
    },
    int("limits.stream_idle_timeout_ms", 0...86_400_000, "end a stream whose client sends nothing this long (0 = never)") {
      $0.streamIdleTimeout = $1 > 0 ? .milliseconds($1) : nil
    },
    int("limits.max_queued_payload_bytes", 0...(1 << 40), "payload bytes all waiting jobs may hold (0 = unbounded)") {
      $0.maxQueuedPayloadBytes = $1 > 0 ? $1 : nil
    },
    int("connection.max_idle_ms", 0...86_400_000, "close idle connections (0 = never)") {
      $0.maxConnectionIdle = $1 > 0 ? .milliseconds($1) : nil
    },
    int("connection.max_age_ms", 0...(86_400_000 * 30), "close older connections gracefully (0 = never)") {
      $0.maxConnectionAge = $1 > 0 ? .milliseconds($1) : nil
    },
    int("connection.max_grace_ms", 0...86_400_000, "calls' time to finish on an aged-out connection (0 = unlimited)") {
      $0.maxConnectionGrace = $1 > 0 ? .milliseconds($1) : nil
    },
    int("connection.keepalive_ms", 1000...(86_400_000 * 30), "ping idle clients this often") { $0.keepaliveTime = .milliseconds($1) },
    int("connection.keepalive_timeout_ms", 100...3_600_000, "drop a client that does not answer a ping") {
      $0.keepaliveTimeout = .milliseconds($1)
    },
    int("limits.tenant_max_queued_jobs", 1...1_000_000, "default per-tenant queued jobs") { $0.defaultTenantLimits.maxQueuedJobs = $1 },
    int("limits.tenant_max_queued_bytes", 1...(1 << 40), "default per-tenant queued bytes") { $0.defaultTenantLimits.maxQueuedBytes = $1 },
    int("limits.tenant_max_open_streams", 1...100_000, "default per-tenant open compression streams") {
      $0.defaultTenantLimits.maxOpenStreams = $1
    },
    string("scheduler.kind", "fair or fifo", allowed: SchedulerKind.allCases.map(\.rawValue)) { c, v in
      c.scheduler = SchedulerKind(rawValue: v) ?? .fair
      return nil
    },
    int("scheduler.in_flight_per_queue", 1...4096, "descriptors kept on each device queue") { $0.inFlightPerQueue = $1 },
    int("scheduler.in_flight_budget_us", 1...10_000_000, "device time kept on each queue") { $0.inFlightBudget = .microseconds($1) },
    int("scheduler.max_batch", 1...256, "descriptors behind one doorbell") { $0.maxBatch = $1 },
    string("device.address", "standalone device (unix:///path); empty embeds one") { c, v in
      guard v.isEmpty || v.hasPrefix("unix://") || v.hasPrefix("/") else { return "must be unix:///path, got '\(v)'" }
      c.deviceAddress = v.isEmpty ? nil : v
      return nil
    },
    int("device.queue_weight", 1...1000, "arbitration weight on a shared device") { $0.queueWeight = UInt32($1) },
    bool("device.software_fallback", "embedded stand-in while the standalone device is down") { $0.softwareFallback = $1 },
    bool("device.verify_compression", "compress-and-verify") { $0.verifyCompression = $1 },
    int("device.completion_timeout_ms", 10...3_600_000, "a job without a completion this long is lost") { $0.completionTimeout = .milliseconds($1) },
    int("device.queues", 1...127, "hardware queues") { $0.device.queueCount = $1 },
    int("device.engines", 1...256, "engine threads (embedded device)") { $0.device.engineCount = $1 },
    Field(path: "device.sq_entries", help: "ring entries per queue (power of two)") { text, c in
      guard let v = Int(text), v >= 2, v <= 65536, v & (v - 1) == 0 else { return "must be a power of two in 2...65536, got '\(text)'" }
      c.device.sqEntries = UInt32(v)
      return nil
    },
    int("device.pool_mib", 1...65536, "data pool per queue, MiB") { $0.device.dataPoolBytes = UInt64($1) << 20 },
    double("device.engine_cap_mbps", 0...1_000_000, "per-engine throughput cap (0 = none)") { $0.device.engineThroughputCapMBps = $1 > 0 ? $1 : nil },
    int("device.idle_spin_us", 0...1_000_000, "engine idle spin before parking") { $0.device.idleSpin = .microseconds($1) },
    int("device.isolation.threshold", 1...1_000_000, "queue errors that isolate the device") { $0.device.isolationThreshold = $1 },
    int("device.isolation.window_ms", 1...86_400_000, "isolation window") { $0.device.isolationWindow = .milliseconds($1) },
    int("device.isolation.cooldown_ms", 0...86_400_000, "isolation length (0 = until lifted)") { $0.device.isolationCooldown = $1 > 0 ? .milliseconds($1) : nil },
    string("device.inject_fault", "fault injection (tests and drills)") { c, v in
      do throws(DeviceError) { c.device.faults = try FaultInjection(parsing: v) } catch { return error.description }
      return nil
    },
    string("files.tenants", "tenants file (YAML, secret)") { c, v in c.tenantsFile = v.isEmpty ? nil : v; return nil },
    string("files.keyring", "keyring file (YAML, secret)") { c, v in c.keyringFile = v.isEmpty ? nil : v; return nil },
    string("files.nonce_state", "nonce counts (JSON)") { c, v in c.nonceStateFile = v.isEmpty ? nil : v; return nil },
    string("files.audit_log", "audit log (JSON lines)") { c, v in c.auditLogFile = v.isEmpty ? nil : v; return nil },
    string("tls.certificate", "PEM certificate chain for the gRPC port") { c, v in c.tlsCertificateChain = v.isEmpty ? nil : v; return nil },
    string("tls.private_key", "PEM private key (a secret file; only its path is here)") { c, v in c.tlsPrivateKey = v.isEmpty ? nil : v; return nil },
    string("tls.client_ca", "mTLS: PEM CA that client certificates must chain to") { c, v in c.tlsClientCA = v.isEmpty ? nil : v; return nil },
    string("log.level", "trace, debug, info, notice, warning, error", allowed: ["trace", "debug", "info", "notice", "warning", "error", "critical"]) { c, v in
      c.logLevel = v
      return nil
    },
    string("log.format", "text or json", allowed: ["text", "json"]) { c, v in c.logFormat = v; return nil },
  ]

  static let byPath: [String: Field] = Dictionary(uniqueKeysWithValues: fields.map { ($0.path, $0) })

  /// `ACCELGATE_LISTEN_PORT` for `listen.port`.
  public static func environmentName(_ path: String) -> String {
    "ACCELGATE_" + path.uppercased().replacingOccurrences(of: ".", with: "_")
  }

  public static var paths: [String] { fields.map(\.path) }

  // MARK: loading

  /// Applies the file at `path` over `configuration`. Reports every problem with its line.
  public static func apply(file path: String, to configuration: inout ServiceConfiguration) throws(Issues) {
    let text: String
    do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
      throw Issues(issues: [Issue(file: path, path: "", message: "cannot read: \(error.localizedDescription)")])
    }
    try apply(yaml: text, name: path, to: &configuration)
  }

  public static func apply(yaml text: String, name: String, to configuration: inout ServiceConfiguration) throws(Issues) {
    let root: Node?
    do { root = try Yams.compose(yaml: text) } catch {
      throw Issues(issues: [Issue(file: name, path: "", message: ConfigErrorText.describe(error, revealValues: true))])
    }
    guard let root else { return }  // an empty file changes nothing
    var issues: [Issue] = []
    var candidate = configuration
    walk(root, prefix: "", file: name, into: &candidate, issues: &issues)
    guard issues.isEmpty else { throw Issues(issues: issues) }
    configuration = candidate
  }

  private static func walk(_ node: Node, prefix: String, file: String, into c: inout ServiceConfiguration, issues: inout [Issue]) {
    func issue(_ n: Node, _ path: String, _ message: String) {
      issues.append(Issue(file: file, line: n.mark.map { $0.line }, column: n.mark.map { $0.column }, path: path, message: message))
    }
    guard case .mapping(let mapping) = node else {
      issue(node, prefix, prefix.isEmpty ? "the file must be a mapping of sections" : "expected a mapping")
      return
    }
    for (keyNode, value) in mapping {
      guard let key = keyNode.string else {
        issue(keyNode, prefix, "keys must be strings")
        continue
      }
      let path = prefix.isEmpty ? key : prefix + "." + key
      if let field = byPath[path] {
        guard case .scalar(let scalar) = value else {
          issue(value, path, "expected a single value")
          continue
        }
        if let problem = field.apply(scalar.string, &c) { issue(value, path, problem) }
      } else if fields.contains(where: { $0.path.hasPrefix(path + ".") }) {
        walk(value, prefix: path, file: file, into: &c, issues: &issues)
      } else {
        issue(keyNode, path, "unknown setting" + suggestion(for: path))
      }
    }
  }

  static func suggestion(for path: String) -> String {
    let best = fields.map(\.path).min { distance($0, path) < distance($1, path) }
    guard let best, distance(best, path) <= max(2, path.count / 4) else { return "" }
    return " (did you mean '\(best)'?)"
  }

  static func distance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    var row = Array(0...b.count)
    for i in 1...max(1, a.count) where !a.isEmpty {
      var prev = row[0]
      row[0] = i
      for j in 1...max(1, b.count) where !b.isEmpty {
        let cur = row[j]
        row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1))
        prev = cur
      }
    }
    return row[b.count]
  }

  /// Applies `ACCELGATE_*` variables that name a setting.
  public static func apply(environment: [String: String], to configuration: inout ServiceConfiguration) throws(Issues) {
    var issues: [Issue] = []
    for field in fields {
      let name = environmentName(field.path)
      guard let value = environment[name] else { continue }
      if let problem = field.apply(value, &configuration) {
        issues.append(Issue(file: "environment", path: name, message: problem))
      }
    }
    guard issues.isEmpty else { throw Issues(issues: issues) }
  }

  /// Applies command-line values, given by setting path.
  public static func apply(overrides: [(path: String, value: String)], to configuration: inout ServiceConfiguration) throws(Issues) {
    var issues: [Issue] = []
    for (path, value) in overrides {
      guard let field = byPath[path] else { preconditionFailure("flag for unknown setting \(path)") }
      if let problem = field.apply(value, &configuration) {
        issues.append(Issue(file: "command line", path: path, message: problem))
      }
    }
    guard issues.isEmpty else { throw Issues(issues: issues) }
  }

  /// The effective configuration, one `path: value` per line, for the start-up log
  /// and `check-config`. Holds no secrets: those live in the files it names.
  public static func render(_ c: ServiceConfiguration) -> [(String, String)] {
    func ms(_ d: Duration) -> String { "\(d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000)" }
    func us(_ d: Duration) -> String { "\(d.components.seconds * 1_000_000 + d.components.attoseconds / 1_000_000_000_000)" }
    return [
      ("listen.host", c.host), ("listen.port", "\(c.port)"), ("listen.max_concurrent_streams", "\(c.maxConcurrentStreams)"),
      ("listen.http2_window_bytes", "\(c.http2TargetWindowSize)"), ("listen.pooled_payloads", "\(c.pooledPayloads)"),
      ("listen.staging_pool_fraction", "\(c.stagingPoolFraction)"),
      ("local.socket", c.localSocket ?? "-"), ("local.control_socket", c.effectiveLocalControlSocket ?? "-"),
      ("local.tenant_max_regions", "\(c.localQuotas.tenantMaxRegions)"),
      ("local.tenant_max_region_bytes", "\(c.localQuotas.tenantMaxRegionBytes)"),
      ("local.tenant_max_descriptors", "\(c.localQuotas.tenantMaxDescriptors)"),
      ("local.tenant_max_connections", "\(c.localQuotas.tenantMaxConnections)"),
      ("local.connection_max_regions", "\(c.localQuotas.connectionMaxRegions)"),
      ("local.connection_max_region_bytes", "\(c.localQuotas.connectionMaxRegionBytes)"),
      ("local.connection_max_descriptors", "\(c.localQuotas.connectionMaxDescriptors)"),
      ("local.max_unauthenticated_connections", "\(c.localQuotas.maxUnauthenticatedConnections)"),
      ("local.frame_timeout_ms", ms(c.localQuotas.frameTimeout)), ("local.descriptor_reserve", "\(c.localQuotas.descriptorReserve)"),
      ("metrics.enabled", "\(c.metricsPort != nil)"), ("metrics.host", c.metricsHost), ("metrics.port", c.metricsPort.map { "\($0)" } ?? "-"),
      ("limits.max_request_bytes", "\(c.maxRequestBytes)"), ("limits.max_decompressed_bytes", "\(c.maxDecompressedBytes)"),
      ("limits.max_queued_jobs", "\(c.maxQueuedJobs)"), ("limits.max_queued_payload_bytes", "\(c.maxQueuedPayloadBytes ?? 0)"),
      ("connection.max_idle_ms", c.maxConnectionIdle.map(ms) ?? "0"), ("connection.max_age_ms", c.maxConnectionAge.map(ms) ?? "0"),
      ("connection.max_grace_ms", c.maxConnectionGrace.map(ms) ?? "0"), ("connection.keepalive_ms", ms(c.keepaliveTime)),
      ("connection.keepalive_timeout_ms", ms(c.keepaliveTimeout)), ("limits.default_deadline_ms", ms(c.defaultDeadline)),
      ("limits.drain_grace_ms", ms(c.drainGrace)), ("limits.stream_write_timeout_ms", ms(c.streamWriteTimeout)),
      ("limits.stream_idle_timeout_ms", c.streamIdleTimeout.map(ms) ?? "0"), ("limits.drain_delay_ms", ms(c.drainDelay)), ("limits.tenant_max_queued_jobs", "\(c.defaultTenantLimits.maxQueuedJobs)"),
      ("limits.tenant_max_queued_bytes", "\(c.defaultTenantLimits.maxQueuedBytes)"),
      ("limits.tenant_max_open_streams", "\(c.defaultTenantLimits.maxOpenStreams)"), ("scheduler.kind", c.scheduler.rawValue),
      ("scheduler.in_flight_per_queue", "\(c.inFlightPerQueue)"), ("scheduler.in_flight_budget_us", us(c.inFlightBudget)),
      ("scheduler.max_batch", "\(c.maxBatch)"), ("device.address", c.deviceAddress ?? "embedded"),
      ("device.queue_weight", "\(c.queueWeight)"), ("device.software_fallback", "\(c.softwareFallback)"),
      ("device.verify_compression", "\(c.verifyCompression)"), ("device.completion_timeout_ms", ms(c.completionTimeout)),
      ("device.queues", "\(c.device.queueCount)"), ("device.engines", "\(c.device.engineCount)"),
      ("device.sq_entries", "\(c.device.sqEntries)"), ("device.pool_mib", "\(c.device.dataPoolBytes >> 20)"),
      ("device.engine_cap_mbps", "\(c.device.engineThroughputCapMBps ?? 0)"), ("device.idle_spin_us", us(c.device.idleSpin)),
      ("device.isolation.threshold", "\(c.device.isolationThreshold)"), ("device.isolation.window_ms", ms(c.device.isolationWindow)),
      ("device.isolation.cooldown_ms", c.device.isolationCooldown.map(ms) ?? "0"), ("device.inject_fault", c.device.faults.description),
      ("files.tenants", c.tenantsFile ?? "-"), ("files.keyring", c.keyringFile ?? "-"), ("files.nonce_state", c.nonceStateFile ?? "-"),
      ("files.audit_log", c.auditLogFile ?? "-"), ("tls.certificate", c.tlsCertificateChain ?? "-"),
      ("tls.private_key", c.tlsPrivateKey ?? "-"), ("tls.client_ca", c.tlsClientCA ?? "-"),
      ("log.level", c.logLevel), ("log.format", c.logFormat),
    ]
  }
}
