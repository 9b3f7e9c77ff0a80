public import AccelABI
internal import CAccelABI
internal import CAccelSys
internal import Foundation
internal import Synchronization
import Glibc

/// The standalone device's control channel: a Unix socket on which gateways
/// ask for queues. Each connection owns the queues it allocated; it may release
/// only those, and when it closes (the gateway exited or died) the device
/// reclaims them. Peers are checked with SO_PEERCRED against allowed users.
///
/// Blocking I/O on its own threads (`ControlListener`): this is the daemon's
/// control plane, never on a job path and never on a cooperative thread. A
/// connection is unauthenticated until its `hello` succeeds; every descriptor a
/// peer passes is closed on every path unless `attach-region` hands it to the
/// device.
public final class ControlServer: @unchecked Sendable {
  public struct Configuration: Sendable {
    public var socketPath: String
    /// Users allowed to connect, besides root and the daemon's own user.
    public var allowedUIDs: Set<UInt32> = []
    /// Socket file mode (owner and group read/write by default, never world).
    public var socketMode: Int32 = 0o660
    /// Whether peers may change fault injection and lift isolation (`inject`,
    /// `lift-isolation`). Off in production; tests and drills turn it on.
    public var allowFaultControl = false
    /// Connections kept before their `hello`; accepting one more closes the oldest.
    public var maxUnauthenticated = 64
    /// Longest a frame may take once its first byte has arrived; then the connection is closed.
    public var frameTimeout: Duration = .seconds(5)
    /// Queues one peer (control connection) may hold, and the most queue memory
    /// (region bytes) they may take together; nil leaves only the device's budget.
    public var maxQueuesPerPeer = 32
    public var maxRegionBytesPerPeer: UInt64? = nil
    /// Highest arbitration weight a peer may ask for: a weight is a share of every
    /// engine, so an unbounded one would starve the other gateways.
    public var maxQueueWeight: UInt32 = 64
    public init(socketPath: String) { self.socketPath = socketPath }
  }

  public let configuration: Configuration
  private let device: EmulatedDevice
  private let listener: ControlListener
  private let running = Atomic<Bool>(true)
  private let log: @Sendable (String) -> Void
  /// Queues owned by each live connection, by session id.
  private let connections = Mutex<[UInt64: Set<UInt32>]>([:])

  public init(device: EmulatedDevice, configuration: Configuration, log: @escaping @Sendable (String) -> Void) throws(ControlError) {
    self.device = device
    self.configuration = configuration
    self.log = log
    let probe = accel_unix_connect(configuration.socketPath)
    if probe >= 0 {
      close(probe)
      throw .refused("another device is already serving \(configuration.socketPath)")
    }
    listener = try ControlListener(
      path: configuration.socketPath, mode: configuration.socketMode,
      limits: ControlListener.Limits(
        maxUnauthenticated: configuration.maxUnauthenticated, frameTimeout: configuration.frameTimeout),
      name: "accel-control", log: log)
  }

  /// Accepts connections on a dedicated thread until `stop()`.
  public func start() {
    listener.start { [self] session in
      // A disallowed user gets one refusal frame, then the connection closes.
      guard let peer = session.peer, isAllowed(peer.uid) else {
        try? session.connection.send(ControlResponse.failure("uid not allowed to use this device"))
        log("refused control connection from a disallowed user")
        return
      }
      serve(session, pid: peer.pid)
    }
  }

  public func stop() {
    guard running.exchange(false, ordering: .sequentiallyConsistent) else { return }
    listener.stop()
  }

  /// Queue ids owned by live connections, by connection (for tests and status).
  public var ownership: [UInt64: Set<UInt32>] { connections.withLock { $0 } }

  /// Connections open, still before `hello`, and closed to make room for newer ones.
  public var connectionCounts: (open: Int, unauthenticated: Int, evicted: UInt64) { listener.counts }

  private func isAllowed(_ uid: UInt32) -> Bool {
    uid == 0 || uid == getuid() || configuration.allowedUIDs.contains(uid)
  }

  private func serve(_ session: ControlListener.Session, pid: Int32) {
    let conn = session.connection
    let me = session.id
    connections.withLock { $0[me] = [] }
    defer {
      let owned = connections.withLock { $0.removeValue(forKey: me) } ?? []
      for q in owned { device.releaseQueue(id: q) }
      if !owned.isEmpty { log("gateway pid \(pid) disconnected; reclaimed queues \(owned.sorted())") }
    }
    var greeted = false
    while running.load(ordering: .relaxed) {
      let request: ControlRequest
      var passed: [Int32] = []
      // receive closes what it received when it fails (EOF mid-frame, timeout, bad frame).
      do { (request, passed) = try session.receive(ControlRequest.self) } catch { return }
      let reply = handle(request, passed: &passed, greeted: &greeted, session: session, pid: pid)
      // Whatever was passed and not handed to the device is closed, on every path:
      // ops before hello, ops that take none, refusals, more descriptors than one.
      passed.forEach { _ = close($0) }
      var fds = reply.fds
      do { try conn.send(reply.response, passing: fds) } catch { fds.forEach { close($0) }; return }
      fds.forEach { close($0) }
      fds = []
    }
  }

  /// One request. Takes from `passed` only the descriptor it hands to the device.
  private func handle(
    _ request: ControlRequest, passed: inout [Int32], greeted: inout Bool, session: ControlListener.Session, pid: Int32
  ) -> (response: ControlResponse, fds: [Int32]) {
    let me = session.id
    var fds: [Int32] = []
    var reply: ControlResponse
    switch request.op {
    case .hello:
      let theirs = request.abi ?? 0
      if theirs >> 16 != ACCEL_ABI_VERSION_MAJOR {
        reply = .failure(
          "ABI mismatch: device speaks \(ACCEL_ABI_VERSION_MAJOR).\(ACCEL_ABI_VERSION_MINOR), driver speaks \(theirs >> 16).\(theirs & 0xffff); upgrade one of them"
        )
      } else {
        greeted = true
        session.authenticated()
        reply = ControlResponse(ok: true)
        reply.abi = ACCEL_ABI_VERSION
        reply.device = "accelgate-emulated"
      }
    case _ where !greeted:
      reply = .failure("say hello first")
    case .capabilities:
      reply = ControlResponse(ok: true)
      reply.engines = device.engines.count
      reply.queues = device.queues.count
      reply.regionBytes = device.regionBytes
      reply.memoryBudget = device.configuration.memoryBudget
      reply.engineThroughputCapMBps = device.configuration.engineThroughputCapMBps
      // Every algorithm the engines run (the list used to miss zstd and lz4).
        reply.algorithms = DeviceAlgorithm.allCases.compactMap(\.capabilityName)
    case .alloc:
      let weight = max(1, request.weight ?? 1)
      let held = connections.withLock { $0[me] ?? [] }
      let heldBytes = device.queues.filter { held.contains($0.id) }.reduce(UInt64(0)) { $0 + $1.region.layout.regionSize }
      if weight > configuration.maxQueueWeight {
        reply = .failure("quota: weight \(weight) is over this daemon's limit of \(configuration.maxQueueWeight)")
        reply.quota = "max-queue-weight"
      } else if held.count >= configuration.maxQueuesPerPeer {
        reply = .failure("quota: this connection holds \(held.count) queues, the most one peer may hold")
        reply.quota = "max-queues-per-peer"
      } else if let limit = configuration.maxRegionBytesPerPeer, heldBytes + device.queueRegionBytes > limit {
        reply = .failure("quota: another queue would take this connection past \(limit) bytes of queue memory")
        reply.quota = "max-region-bytes-per-peer"
      } else {
        do {
          let q = try device.allocateQueue(weight: weight)
          connections.withLock { _ = $0[me, default: []].insert(q.id) }
          reply = ControlResponse(ok: true)
          reply.queue = q.id
          fds = [device.exportQueue(id: q.id) ?? -1].filter { $0 >= 0 }
        } catch {
          reply = .failure(error.description)
        }
      }
    case .release:
      let id = request.queue ?? .max
      let mine = connections.withLock { $0[me]?.remove(id) != nil }
      if mine {
        device.releaseQueue(id: id)
        reply = ControlResponse(ok: true)
      } else {
        reply = .failure("queue \(id) does not belong to this gateway")
      }
    case .attachRegion, .detachRegion:
      let id = request.queue ?? .max
      let mine = connections.withLock { $0[me]?.contains(id) == true }
      guard mine, let region = request.region else {
        reply = .failure("queue \(id) does not belong to this gateway, or no region id")
        break
      }
      if request.op == .detachRegion {
        reply = device.detachExternalRegion(queueID: id, id: region) ? ControlResponse(ok: true) : .failure("no region \(region) on queue \(id)")
        break
      }
      guard passed.count == 1, let size = request.size else {
        reply = .failure("attach-region needs exactly one memfd and a size")
        break
      }
      do {
        // The device owns the descriptor from here (it closes it on refusal too).
        try device.attachExternalRegion(queueID: id, id: region, fd: passed.removeFirst(), size: size)
        reply = ControlResponse(ok: true)
      } catch {
        reply = .failure(error.description)
      }
    case .heartbeat:
      reply = ControlResponse(ok: true)
      reply.heartbeat = device.queues.first?.heartbeat.loadAcquire() ?? 0
    case .status:
      reply = ControlResponse(ok: true)
      let e = device.errorStatistics
      reply.isolated = e.isolated
      reply.queueErrors = e.queueErrors
      reply.resets = e.resets
      reply.isolations = e.isolations
      reply.fault = device.faults.description
    case .inject, .liftIsolation:
      guard configuration.allowFaultControl else {
        reply = .failure("fault control is disabled on this device (start it with --allow-fault-control)")
        break
      }
      if request.op == .liftIsolation {
        device.liftIsolation()
        reply = ControlResponse(ok: true)
        break
      }
      do {
        let plan = try FaultInjection(parsing: request.fault ?? "none")
        device.injectFaults(plan)
        log("peer pid \(pid) set fault injection to \(plan)")
        reply = ControlResponse(ok: true)
        reply.fault = plan.description
      } catch {
        reply = .failure(error.description)
      }
    }
    return (reply, fds)
  }
}

