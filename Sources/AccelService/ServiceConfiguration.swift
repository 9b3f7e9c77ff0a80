public import AccelDevice
public import AccelScheduler

/// Everything `accelgate serve` needs, with defaults that run out of the box.
public struct ServiceConfiguration: Sendable {
  public var host: String = "127.0.0.1"
  public var port: Int = 50051
  /// Largest payload (`data` field) a request may carry.
  public var maxRequestBytes: Int = 4 << 20
  /// Largest decompressed output a Decompress call may produce (the bomb cap).
  public var maxDecompressedBytes: Int = 4 << 20
  /// Jobs that may wait for the device at once.
  public var maxQueuedJobs: Int = 1024
  /// Most descriptors kept in flight on each hardware queue.
  public var inFlightPerQueue: Int = 8
  /// Estimated device time kept in flight on each hardware queue (one job always fits).
  public var inFlightBudget: Duration = .milliseconds(2)
  /// Most descriptors behind one doorbell.
  public var maxBatch: Int = 16
  /// Deadline applied to calls that set none.
  public var defaultDeadline: Duration = .seconds(30)
  /// HTTP/2 frame size the server accepts. Large frames cut per-frame work on MiB payloads.
  public var http2MaxFrameSize: Int = 1 << 20
  /// Each stream's initial HTTP/2 flow-control window (the C core's lookahead;
  /// its BDP probing grows windows from there). HTTP/2's default (64 KiB) caps
  /// a MiB-sized call at a few round trips per window.
  public var http2TargetWindowSize: Int = 4 << 20
  /// Network lane (docs/NETWORK_LANE.md): Compress, Decompress, Encrypt and
  /// Decrypt decode their payload straight into a device queue's pool and write
  /// the result straight from the pool into the response (one copy each way
  /// instead of two). Off: the generated protobuf coding, as before.
  public var pooledPayloads: Bool = true
  /// Fraction of each queue's pool where payloads may wait staged (the network
  /// lane's staging zone); always shrunk so the rest still holds the largest job.
  public var stagingPoolFraction: Double = 0.5
  /// YAML file listing tenants, weights, key hashes and limits; nil runs a single
  /// open `default` tenant. Reloaded on SIGHUP.
  public var tenantsFile: String? = nil
  /// YAML keyring of named, versioned keys per tenant (a secret; reloaded on SIGHUP).
  public var keyringFile: String? = nil
  /// Where per-key-version nonce counts are persisted (JSON); nil keeps them in memory only.
  public var nonceStateFile: String? = nil
  /// Append-only JSON-lines audit log of key operations; nil logs nowhere.
  public var auditLogFile: String? = nil
  /// Limits for tenants that do not set their own (and for the open default tenant).
  public var defaultTenantLimits: TenantLimits = .defaults
  /// Which policy orders waiting jobs: weighted fair (default) or FIFO for comparison.
  public var scheduler: SchedulerKind = .fair
  /// Concurrent streams per HTTP/2 connection, advertised to clients so they
  /// queue calls instead of overrunning the server.
  public var maxConcurrentStreams: Int = 256
  /// A standalone device daemon to use (`unix:///run/accelgate/dev0.sock`); nil embeds one.
  public var deviceAddress: String? = nil
  /// Arbitration weight of this gateway's queues on a shared device (fairness between gateways).
  public var queueWeight: UInt32 = 1
  /// The embedded device (also: how many queues to ask a standalone device for).
  public var device: DeviceConfiguration = .defaults
  /// With a standalone device: serve from an embedded software device while it
  /// is down (health stays SERVING; DescribeDevice and the log say "degraded").
  public var softwareFallback = false
  /// Compress-and-verify: the device decompresses every compression result and
  /// compares it with the input before completing (catches silent corruption).
  public var verifyCompression = false
  /// A job without a completion for this long is declared lost; its queue is
  /// reset and the job retried once. Must exceed the longest job.
  public var completionTimeout: Duration = .seconds(5)

  /// On SIGTERM, how long calls in flight may take to finish before the server
  /// stops anyway (they then end CANCELLED). The process exits 0 either way.
  public var drainGrace: Duration = .seconds(30)
  /// On SIGTERM, how long health reports NOT_SERVING while new calls are still
  /// served, before the server stops accepting them: load balancers and
  /// readiness probes see the drain before any call is refused.
  public var drainDelay: Duration = .zero
  /// Local lane (docs/LOCAL_LANE.md): gRPC over this Unix socket for co-located
  /// clients; nil = off.
  public var localSocket: String? = nil
  /// The local lane's control socket (memory registration); default: `localSocket` + ".ctl".
  public var localControlSocket: String? = nil
  var effectiveLocalControlSocket: String? { localControlSocket ?? localSocket.map { $0 + ".ctl" } }
  /// The local lane's bounds per tenant and per control connection (regions,
  /// bytes, descriptors, connections) and its control socket's timeouts.
  public var localQuotas: LocalLaneQuotas = .defaults

  /// Where Prometheus scrapes `/metrics` (plain HTTP); nil port turns it off.
  public var metricsHost: String = "127.0.0.1"
  public var metricsPort: Int? = 9464

  /// Largest total output of one DecompressStream (callers may ask for less).
  public var maxStreamOutputBytes: Int = 64 << 30
  /// A CompressStream/DecompressStream whose client accepts no output for this
  /// long (it stopped reading: HTTP/2 flow control holds the write) ends with
  /// RESOURCE_EXHAUSTED and gives its device context back.
  public var streamWriteTimeout: Duration = .seconds(30)
  /// A CompressStream/DecompressStream whose client sends no message for this
  /// long ends with RESOURCE_EXHAUSTED and gives its device context back (nil:
  /// never). Submit is exempt (idle gaps between jobs hold no device context),
  /// and so is health Watch.
  public var streamIdleTimeout: Duration? = .seconds(60)
  /// Payload bytes all waiting jobs together may hold; beyond it new jobs get
  /// RESOURCE_EXHAUSTED (`gateway_memory`) with a retry hint. nil = unbounded.
  public var maxQueuedPayloadBytes: Int? = 1 << 30
  /// Connection hygiene: close connections idle this long (nil = never), close
  /// connections older than `maxConnectionAge` gracefully (nil = never) and give
  /// their calls `maxConnectionGrace` to finish; ping idle clients every
  /// `keepaliveTime` and drop them if no answer comes within `keepaliveTimeout`.
  public var maxConnectionIdle: Duration? = .seconds(30 * 60)
  public var maxConnectionAge: Duration? = nil
  public var maxConnectionGrace: Duration? = nil
  public var keepaliveTime: Duration = .seconds(2 * 60 * 60)
  public var keepaliveTimeout: Duration = .seconds(20)

  /// TLS for the gRPC port: PEM certificate chain and private key (both or neither).
  public var tlsCertificateChain: String? = nil
  public var tlsPrivateKey: String? = nil
  /// mTLS: PEM CA bundle client certificates must chain to; nil accepts clients without certificates.
  public var tlsClientCA: String? = nil

  /// swift-log level name, and the log format: `text` or `json` (one object per line).
  public var logLevel: String = "info"
  public var logFormat: String = "text"

  public init() {}
  public static var defaults: Self { Self() }
  public static func defaults(_ configure: (inout Self) -> Void) -> Self {
    var c = Self()
    configure(&c)
    return c
  }

  /// Why settings that are each valid do not fit together, or nil.
  public var consistencyProblem: String? {
    if metricsPort != nil && metricsPort == port && port != 0 && metricsHost == host {
      return "metrics.port and listen.port are both \(port)"
    }
    if softwareFallback && deviceAddress == nil { return "device.software_fallback needs device.address (a standalone device)" }
    if (tlsCertificateChain == nil) != (tlsPrivateKey == nil) { return "tls.certificate and tls.private_key go together" }
    if tlsClientCA != nil && tlsCertificateChain == nil { return "tls.client_ca (mTLS) needs tls.certificate and tls.private_key" }
    return nil
  }

  /// Transport limit on one request message. It sits at 4× the payload limit,
  /// so a payload over its limit reaches the service, which answers
  /// RESOURCE_EXHAUSTED with a precise message (which limit, how far over);
  /// past it the C core answers RESOURCE_EXHAUSTED itself without reading the
  /// message. Either way the connection stays.
  var transportMaxRequestBytes: Int { maxRequestBytes.multipliedReportingOverflow(by: 4).partialValue + 64 * 1024 }
}
