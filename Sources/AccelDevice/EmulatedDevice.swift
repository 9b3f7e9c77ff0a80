internal import AccelABI
internal import CAccelABI
internal import CAccelEngines
internal import Foundation
internal import Synchronization

/// A software accelerator behind a hardware interface.
///
/// Each queue is a memfd region (see `accel_abi.h`). Engine threads poll the
/// submission rings, copy each descriptor into private memory (as a DMA fetch
/// would, so a peer rewriting it later cannot change what was validated), run
/// the job in place on the data pool and post a completion. Idle engines spin
/// for `idleSpin`, then set `sq_need_wakeup` and park on the doorbell futexes.
public final class EmulatedDevice: @unchecked Sendable {
  public let configuration: DeviceConfiguration
  public let queues: [DeviceQueue]
  public let engines: [EngineStats]

  private let running = Atomic<Bool>(false)
  /// Engines currently parked; the need-wakeup flags are cleared when it drops to 0.
  private let sleepers = Atomic<Int>(0)
  private let exited = DispatchGroup()
  /// Busy engines bump every queue's heartbeat at least this often (ns); parked ones on each wake-up.
  static let heartbeatInterval: UInt64 = 10_000_000

  public init(configuration: DeviceConfiguration = .defaults) throws(DeviceError) {
    guard configuration.queueCount >= 1, configuration.queueCount <= 128, configuration.engineCount >= 1 else {
      throw .invalidConfiguration("need 1...128 queues and at least one engine")
    }
    self.configuration = configuration
    let layout: RegionLayout
    do {
      layout = try RegionLayout(
        sqEntries: configuration.sqEntries, cqEntries: configuration.sqEntries,
        dataPoolBytes: configuration.dataPoolBytes)
    } catch { throw .invalidConfiguration(error.description) }
    var queues: [DeviceQueue] = []
    for i in 0..<configuration.queueCount {
      let weight = i < configuration.queueWeights.count ? max(1, configuration.queueWeights[i]) : 1
      do {
        let region = try QueueRegion.create(layout: layout, queueID: UInt32(i), weight: weight, name: "accelgate-q\(i)")
        queues.append(DeviceQueue(region: region))
      } catch { throw .region(error.description) }
    }
    self.queues = queues
    self.engines = (0..<configuration.engineCount).map { EngineStats(id: $0) }
  }

  deinit { stop() }

  /// Starts the engine threads. Idempotent.
  public func start() {
    guard running.compareExchange(expected: false, desired: true, ordering: .sequentiallyConsistent).exchanged else {
      return
    }
    for stats in engines {
      exited.enter()
      let thread = Thread { [self] in
        self.engineLoop(stats)
        self.exited.leave()
      }
      thread.name = "accel-engine-\(stats.id)"
      thread.start()
    }
  }

  /// Stops the engines and waits for them to exit. Queued descriptors stay in the rings.
  public func stop() {
    guard running.compareExchange(expected: true, desired: false, ordering: .sequentiallyConsistent).exchanged else {
      return
    }
    for q in queues {
      q.sqDoorbell.fetchAdd(1)
      q.sqDoorbell.wake()
    }
    exited.wait()
  }

  public var isRunning: Bool { running.load(ordering: .relaxed) }

  /// A new file descriptor for queue `index`'s memfd, for a driver to map.
  public func exportQueue(_ index: Int) -> Int32 { dup(queues[index].region.fd) }

  // MARK: engine loop

  private func engineLoop(_ stats: EngineStats) {
    guard let ctx = accel_engine_create() else { return }
    defer { accel_engine_destroy(ctx) }
    let spinNs = configuration.idleSpin.nanoseconds
    let capBytesPerNs = configuration.engineThroughputCapMBps.map { $0 * 1e6 / 1e9 }
    // Weighted round-robin: a queue may take `weight` descriptors in a row.
    var cursor = stats.id % queues.count
    var credit = queues[cursor].weight
    var lastWork = SharedMemory.nowNanoseconds()
    var lastBeat = lastWork

    while running.load(ordering: .relaxed) {
      var didWork = false
      for step in 0..<queues.count {
        let q = queues[(cursor + step) % queues.count]
        guard let sqe = q.fetch() else { continue }
        if step != 0 {
          cursor = (cursor + step) % queues.count
          credit = q.weight
        }
        process(sqe, on: q, ctx: ctx, stats: stats, capBytesPerNs: capBytesPerNs)
        credit -= 1
        if credit == 0 {
          cursor = (cursor + 1) % queues.count
          credit = queues[cursor].weight
        }
        didWork = true
        break
      }
      let now = SharedMemory.nowNanoseconds()
      if now &- lastBeat > Self.heartbeatInterval {
        for q in queues { q.heartbeat.fetchAdd(1) }
        lastBeat = now
      }
      if didWork {
        lastWork = now
      } else if now &- lastWork < spinNs {
        SharedMemory.cpuRelax()
      } else {
        park(stats)
        lastWork = SharedMemory.nowNanoseconds()
      }
    }
  }

  /// Parks on every queue's doorbell. The Dekker pair with the driver is:
  /// engine stores `sq_need_wakeup = 1`, fence, loads `sq_tail`;
  /// driver stores `sq_tail`, fence, loads `sq_need_wakeup`.
  /// One of them always sees the other's store, so no wake-up is lost.
  private func park(_ stats: EngineStats) {
    sleepers.add(1, ordering: .sequentiallyConsistent)
    for q in queues { q.sqNeedWakeup.storeSeqCst(1) }
    SharedMemory.fence()
    let seen = queues.map { $0.sqDoorbell.loadAcquire() }
    let pending = queues.contains { $0.hasPendingWork }
    if !pending && running.load(ordering: .relaxed) {
      stats.parks.add(1, ordering: .relaxed)
      SharedMemory.waitAny(
        queues.map { $0.sqDoorbell.pointer }, expected: seen,
        timeoutNanoseconds: configuration.parkTimeout.nanoseconds)
    }
    for q in queues { q.heartbeat.fetchAdd(1) }
    if sleepers.subtract(1, ordering: .sequentiallyConsistent).newValue == 0 {
      for q in queues { q.sqNeedWakeup.storeSeqCst(0) }
    }
  }

  private func process(
    _ sqe: accel_sqe, on q: DeviceQueue, ctx: OpaquePointer, stats: EngineStats, capBytesPerNs: Double?
  ) {
    let start = SharedMemory.nowNanoseconds()
    var status = DescriptorRules.validate(sqe, layout: q.region.layout)
    var produced: UInt32 = 0
    var consumed: UInt32 = 0
    if status == .ok {
      let src = UnsafePointer(q.region.bytes(at: sqe.src_offset).assumingMemoryBound(to: UInt8.self))
      let dst = q.region.bytes(at: sqe.dst_offset).assumingMemoryBound(to: UInt8.self)
      switch DeviceOpcode(rawValue: sqe.opcode) {
      case .compress:
        status = DeviceStatus(
          rawValue: accel_engine_compress(
            ctx, sqe.algorithm, sqe.level, src, sqe.src_length, dst, sqe.dst_capacity, &produced, &consumed))
          ?? .engineError
      case .decompress:
        status = DeviceStatus(
          rawValue: accel_engine_decompress(
            ctx, sqe.algorithm, src, sqe.src_length, dst, sqe.dst_capacity, &produced, &consumed))
          ?? .engineError
      default:
        status = .ok  // NOP
      }
      // The engine reports how much it wrote; never more than the buffer.
      if produced > sqe.dst_capacity { status = .engineError; produced = 0 }
    }
    var elapsed = SharedMemory.nowNanoseconds() &- start
    if let cap = capBytesPerNs, cap > 0, sqe.src_length > 0 {
      let modeled = UInt64(Double(sqe.src_length) / cap)
      if modeled > elapsed {
        SharedMemory.sleep(nanoseconds: modeled - elapsed)
        elapsed = modeled
      }
    }
    stats.jobs.add(1, ordering: .relaxed)
    stats.busyNanoseconds.add(elapsed, ordering: .relaxed)
    var cqe = accel_cqe()
    cqe.cookie = sqe.cookie
    cqe.status = status.rawValue
    cqe.error_class = status.errorClass.rawValue
    cqe.produced = status == .ok ? produced : 0
    cqe.consumed = consumed
    cqe.engine_id = UInt16(truncatingIfNeeded: stats.id)
    cqe.engine_ns = elapsed
    q.post(cqe, isRunning: { self.running.load(ordering: .relaxed) })
  }
}

/// Counters one engine keeps about itself.
public final class EngineStats: Sendable {
  public let id: Int
  let jobs = Atomic<UInt64>(0)
  let busyNanoseconds = Atomic<UInt64>(0)
  let parks = Atomic<UInt64>(0)
  init(id: Int) { self.id = id }

  /// Jobs completed by this engine.
  public var jobCount: UInt64 { jobs.load(ordering: .relaxed) }
  /// Device time spent on jobs, including any throughput-cap pacing.
  public var busyTime: UInt64 { busyNanoseconds.load(ordering: .relaxed) }
  /// Times the engine parked on the doorbell.
  public var parkCount: UInt64 { parks.load(ordering: .relaxed) }
}

/// Device construction failures.
public enum DeviceError: Error, CustomStringConvertible {
  case invalidConfiguration(String)
  case region(String)

  public var description: String {
    switch self {
    case .invalidConfiguration(let why): "invalid device configuration: \(why)"
    case .region(let why): "cannot create queue region: \(why)"
    }
  }
}
