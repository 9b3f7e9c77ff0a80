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
/// Blocking I/O on its own threads: this is the daemon's control plane, never
/// on a job path and never on a cooperative thread.
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
    public init(socketPath: String) { self.socketPath = socketPath }
  }

  public let configuration: Configuration
  private let device: EmulatedDevice
  private let listener: Int32
  private let running = Atomic<Bool>(true)
  private let log: @Sendable (String) -> Void
  private let connections = Mutex<[Int32: Set<UInt32>]>([:])

  public init(device: EmulatedDevice, configuration: Configuration, log: @escaping @Sendable (String) -> Void) throws(ControlError) {
    self.device = device
    self.configuration = configuration
    self.log = log
    let probe = accel_unix_connect(configuration.socketPath)
    if probe >= 0 {
      close(probe)
      throw .refused("another device is already serving \(configuration.socketPath)")
    }
    let fd = accel_unix_listen(configuration.socketPath, configuration.socketMode)
    guard fd >= 0 else {
      throw .io("listen \(configuration.socketPath): \(String(cString: strerror(accel_errno())))")
    }
    listener = fd
  }

  /// Accepts connections on a dedicated thread until `stop()`.
  public func start() {
    let t = Thread { [self] in acceptLoop() }
    t.name = "accel-control"
    t.start()
  }

  public func stop() {
    guard running.exchange(false, ordering: .sequentiallyConsistent) else { return }
    shutdown(listener, Int32(SHUT_RDWR))
    close(listener)
    unlink(configuration.socketPath)
  }

  /// Queue ids owned by live connections (for tests and status).
  public var ownership: [Int32: Set<UInt32>] { connections.withLock { $0 } }

  private func acceptLoop() {
    while running.load(ordering: .relaxed) {
      let fd = accel_unix_accept(listener)
      guard fd >= 0 else {
        if running.load(ordering: .relaxed) && accel_errno() != EINTR { usleep(10_000) }
        continue
      }
      let conn = ControlConnection(fd: fd)
      guard let peer = conn.peer(), isAllowed(peer.uid) else {
        try? conn.send(ControlResponse.failure("uid not allowed to use this device"))
        conn.close()
        log("refused control connection from a disallowed user")
        continue
      }
      connections.withLock { $0[fd] = [] }
      let t = Thread { [self] in serve(conn, pid: peer.pid) }
      t.name = "accel-control-\(fd)"
      t.start()
    }
  }

  private func isAllowed(_ uid: UInt32) -> Bool {
    uid == 0 || uid == getuid() || configuration.allowedUIDs.contains(uid)
  }

  private func serve(_ conn: ControlConnection, pid: Int32) {
    defer {
      let owned = connections.withLock { $0.removeValue(forKey: conn.fd) } ?? []
      for q in owned { device.releaseQueue(id: q) }
      if !owned.isEmpty { log("gateway pid \(pid) disconnected; reclaimed queues \(owned.sorted())") }
      conn.close()
    }
    var greeted = false
    while running.load(ordering: .relaxed) {
      let request: ControlRequest
      var passed: [Int32] = []
      do { (request, passed) = try conn.receive(ControlRequest.self) } catch { return }
      // Only attach-region carries a descriptor; anything else passed is closed.
      if request.op != .attachRegion { passed.forEach { _ = close($0) } }
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
        do {
          let q = try device.allocateQueue(weight: max(1, request.weight ?? 1))
          connections.withLock { _ = $0[conn.fd, default: []].insert(q.id) }
          reply = ControlResponse(ok: true)
          reply.queue = q.id
          fds = [device.exportQueue(id: q.id) ?? -1].filter { $0 >= 0 }
        } catch {
          reply = .failure(error.description)
        }
      case .release:
        let id = request.queue ?? .max
        let mine = connections.withLock { $0[conn.fd]?.remove(id) != nil }
        if mine {
          device.releaseQueue(id: id)
          reply = ControlResponse(ok: true)
        } else {
          reply = .failure("queue \(id) does not belong to this gateway")
        }
      case .attachRegion, .detachRegion:
        let id = request.queue ?? .max
        let mine = connections.withLock { $0[conn.fd]?.contains(id) == true }
        guard mine, let region = request.region else {
          passed.forEach { _ = close($0) }
          reply = .failure("queue \(id) does not belong to this gateway, or no region id")
          break
        }
        if request.op == .detachRegion {
          reply = device.detachExternalRegion(queueID: id, id: region) ? ControlResponse(ok: true) : .failure("no region \(region) on queue \(id)")
          break
        }
        guard passed.count == 1, let size = request.size else {
          passed.forEach { _ = close($0) }
          reply = .failure("attach-region needs exactly one memfd and a size")
          break
        }
        do {
          try device.attachExternalRegion(queueID: id, id: region, fd: passed[0], size: size)
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
      do { try conn.send(reply, passing: fds) } catch { fds.forEach { close($0) }; return }
      fds.forEach { close($0) }
    }
  }
}
