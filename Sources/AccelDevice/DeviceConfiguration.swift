/// How the emulated device is built: queues, engines and their timing.
public struct DeviceConfiguration: Sendable, Equatable {
  /// Number of hardware queues (regions). At least 1.
  public var queueCount: Int
  /// Engine threads shared by all queues. At least 1.
  public var engineCount: Int
  /// Submission ring entries per queue (power of two); the completion ring has as many.
  public var sqEntries: UInt32
  /// Bytes of each queue's data pool, where job buffers live.
  public var dataPoolBytes: UInt64
  /// Per-engine throughput cap in MB/s (10^6 bytes of input per second); nil runs at CPU speed.
  /// Lets the device model hardware slower than the CPU, for tests and fairness benchmarks.
  public var engineThroughputCapMBps: Double?
  /// How long an idle engine keeps polling before it parks on the doorbell futex.
  public var idleSpin: Duration
  /// Longest a parked engine sleeps before it re-checks state and bumps the heartbeat.
  public var parkTimeout: Duration
  /// Most bytes of queue regions the device may hold at once; nil = unbounded.
  public var memoryBudget: UInt64? = nil
  /// Key slots per queue (ABI 1.1), for crypto jobs in flight.
  public var keySlots: UInt32 = 256
  /// Arbitration weight of each queue (weighted round-robin); missing entries default to 1.
  public var queueWeights: [UInt32]
  /// Queue errors within `isolationWindow` that isolate the whole device (as
  /// HiSilicon's QM isolation strategy does): every queue is flagged isolated and
  /// runs nothing until the isolation is lifted.
  public var isolationThreshold: Int = 16
  public var isolationWindow: Duration = .seconds(10)
  /// How long an isolation lasts before the device lifts it by itself; nil keeps
  /// it until an operator lifts it.
  public var isolationCooldown: Duration? = .seconds(30)
  /// Comparison mode for the doorbell benchmark only: each queue gets an eventfd
  /// that the driver writes for every job, and idle engines wait in poll(2) on
  /// those instead of parking on the futex doorbells. Embedded device only.
  public var eventfdDoorbells = false
  /// Faults to inject from the start (tests and drills); `.none` in production.
  public var faults: FaultInjection = .none
  /// The first queue id handed out (tests start near 2^32 to see the ids wrap).
  public var firstQueueID: UInt32 = 0

  public init(
    queueCount: Int = 2,
    engineCount: Int = 2,
    sqEntries: UInt32 = 256,
    dataPoolBytes: UInt64 = 64 << 20,
    engineThroughputCapMBps: Double? = nil,
    idleSpin: Duration = .microseconds(50),
    parkTimeout: Duration = .milliseconds(100),
    queueWeights: [UInt32] = []
  ) {
    self.queueCount = queueCount
    self.engineCount = engineCount
    self.sqEntries = sqEntries
    self.dataPoolBytes = dataPoolBytes
    self.engineThroughputCapMBps = engineThroughputCapMBps
    self.idleSpin = idleSpin
    self.parkTimeout = parkTimeout
    self.queueWeights = queueWeights
  }

  public static var defaults: Self { Self() }

  public static func defaults(_ configure: (inout Self) -> Void) -> Self {
    var c = Self()
    configure(&c)
    return c
  }
}

extension Duration {
  var nanoseconds: UInt64 {
    let (s, a) = components
    return UInt64(max(0, s)) * 1_000_000_000 + UInt64(max(0, a / 1_000_000_000))
  }
}
