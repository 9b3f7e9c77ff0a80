internal import AccelABI
internal import CAccelABI
internal import AccelDispatcher
internal import AccelDriver
internal import AccelProto
internal import AccelScheduler
internal import CAccelSys
internal import Foundation
internal import GRPCCore
internal import Logging
internal import Synchronization
import Glibc

/// The local lane: co-located clients register memory (sealed memfds) over a
/// Unix control socket, then name spans of it in their gRPC calls; the device
/// reads and writes those pages in place, so no payload crosses the socket.
///
/// Regions belong to the tenant whose API key registered them and to the
/// control connection that passed them: when that connection closes (the
/// client exited or died), its regions are unregistered once the jobs using
/// them have completed.
final class RegionRegistry: @unchecked Sendable {
  /// One registered region. `fd` stays open until the region is gone, so the
  /// device can be attached again after a failover.
  final class Region: @unchecked Sendable {
    let id: UInt16
    let token: String
    let tenant: String
    let size: UInt64
    let fd: Int32
    let connection: Int32
    init(id: UInt16, token: String, tenant: String, size: UInt64, fd: Int32, connection: Int32) {
      (self.id, self.token, self.tenant, self.size, self.fd, self.connection) = (id, token, tenant, size, fd, connection)
    }
    deinit { close(fd) }
  }

  /// A job's hold on a region: the region stays registered until the job ends.
  struct Binding: Sendable {
    let regionID: UInt16
  }

  private struct Attachment {
    let driver: ObjectIdentifier
    let host: any ExternalRegionHost
    let queueIDs: [UInt32]
  }

  private struct State {
    var byToken: [String: Region] = [:]
    var byID: [UInt16: Region] = [:]
    var nextID: UInt16 = 1
    var inFlight: [UInt16: Int] = [:]
    var closing: Set<UInt16> = []
    var drained: [UInt16: DispatchSemaphore] = [:]
    var attached: [UInt16: [Attachment]] = [:]
  }

  private let state = Mutex(State())
  private let dispatcher: Dispatcher
  private let logger: Logger
  /// Regions one gateway holds at once (the ABI's id space).
  static let maxRegions = Int(ACCEL_EXT_REGION_MAX)

  init(dispatcher: Dispatcher, logger: Logger) {
    self.dispatcher = dispatcher
    self.logger = logger
  }

  var count: Int { state.withLock { $0.byToken.count } }

  /// Regions held (registered, or unregistered and waiting for the calls using
  /// them), and spans of them bound by calls in progress (a call naming two regions holds two).
  var usage: (regions: Int, spansInUse: Int) {
    state.withLock { s in (s.byID.count, s.inFlight.values.reduce(0, +)) }
  }

  /// Registers `fd` (ownership passes here) for `tenant`, after checking its
  /// seal and size, and attaches it to every queue of the current device.
  func register(fd: Int32, size: UInt64, tenant: String, connection: Int32) throws(LocalLaneError) -> Region {
    do { try ExternalRegion.check(fd: fd, claimedSize: size) } catch {
      close(fd)
      throw .refused(error.description)
    }
    let region = state.withLock { s -> Region? in
      guard s.byID.count < Self.maxRegions else { return nil }
      var id = s.nextID
      while s.byID[id] != nil || s.closing.contains(id) { id = id >= UInt16(Self.maxRegions) ? 1 : id + 1 }
      s.nextID = id >= UInt16(Self.maxRegions) ? 1 : id + 1
      var random = [UInt8](repeating: 0, count: 16)
      for i in random.indices { random[i] = UInt8.random(in: 0...255) }
      let token = "r\(id)-" + random.map { String(format: "%02x", $0) }.joined()
      let r = Region(id: id, token: token, tenant: tenant, size: size, fd: fd, connection: connection)
      s.byToken[token] = r
      s.byID[id] = r
      return r
    }
    guard let region else {
      close(fd)
      throw .refused("this gateway holds \(Self.maxRegions) regions already")
    }
    do { try attach(region, to: dispatcher.driver) } catch {
      state.withLock { s in
        s.byToken[region.token] = nil
        s.byID[region.id] = nil
      }
      throw error
    }
    return region
  }

  /// Maps the region into every queue of `driver`'s device (once per driver).
  private func attach(_ region: Region, to driver: DeviceDriver) throws(LocalLaneError) {
    let key = ObjectIdentifier(driver)
    if state.withLock({ s in s.attached[region.id]?.contains { $0.driver == key } == true }) { return }
    guard let host = driver.regionHost else { throw .unavailable("this device cannot map client memory") }
    var done: [UInt32] = []
    for q in driver.queues {
      do { try host.attachRegion(queueID: q.queueID, region: region.id, fd: region.fd, size: region.size) } catch {
        for id in done { host.detachRegion(queueID: id, region: region.id) }
        throw .refused("the device refused the region: \(error)")
      }
      done.append(q.queueID)
    }
    state.withLock { $0.attached[region.id, default: []].append(Attachment(driver: key, host: host, queueIDs: done)) }
  }

  /// Resolves a span of a job: the caller's own region, in bounds, registered.
  /// Holds the region until `unbind`.
  /// An input longer than `maxLength` is refused; an output span is only used
  /// up to `maxLength` (`clamp`), since it is room, not data.
  func bind(_ span: Accelgate_V1_RegionSpan, tenant: String, what: String, maxLength: Int, clamp: Bool = false)
    throws(LocalLaneError) -> (ExternalSpan, Binding)
  {
    let driver = dispatcher.driver
    let region = try state.withLock { s throws(LocalLaneError) -> Region in
      guard let r = s.byToken[span.region] else { throw .notFound("\(what): no region \(span.region.isEmpty ? "(empty token)" : span.region)") }
      guard r.tenant == tenant else { throw .permissionDenied("\(what): region \(span.region) belongs to another tenant") }
      guard !s.closing.contains(r.id) else { throw .failedPrecondition("\(what): region \(span.region) is being unregistered") }
      guard span.offset <= r.size, span.length <= r.size - span.offset else {
        throw .invalidArgument(
          "\(what): offset \(span.offset) + length \(span.length) is outside the region's \(r.size) bytes")
      }
      guard clamp || span.length <= UInt64(maxLength) else {
        throw .outOfRange("\(what): length \(span.length) is over the limit of \(maxLength) bytes")
      }
      s.inFlight[r.id, default: 0] += 1
      return r
    }
    do { try attach(region, to: driver) } catch {
      unbind(Binding(regionID: region.id))
      throw error
    }
    let usable = min(span.length, UInt64(maxLength), UInt64(UInt32.max))
    return (ExternalSpan(region: region.id, offset: span.offset, length: UInt32(usable)), Binding(regionID: region.id))
  }

  func unbind(_ b: Binding) {
    let finished = state.withLock { s -> Bool in
      let n = (s.inFlight[b.regionID] ?? 1) - 1
      s.inFlight[b.regionID] = n > 0 ? n : nil
      return n <= 0 && s.closing.contains(b.regionID)
    }
    if finished { finish(b.regionID) }
  }

  /// Unregisters a region of `tenant`: new jobs are refused at once; returns
  /// when the jobs using it have completed and the device has let go of it.
  func unregister(token: String, tenant: String) throws(LocalLaneError) {
    let (wait, idle) = try state.withLock { s throws(LocalLaneError) -> (DispatchSemaphore?, UInt16?) in
      guard let r = s.byToken[token], r.tenant == tenant else { throw .notFound("no region \(token) of this tenant") }
      return beginClosing(&s, r.id)
    }
    if let idle { finish(idle) }
    wait?.wait()
  }

  /// Unregisters every region passed on a control connection (it closed).
  func unregisterAll(connection: Int32) {
    let closing = state.withLock { s in
      s.byToken.values.filter { $0.connection == connection }.map { beginClosing(&s, $0.id) }
    }
    for (_, idle) in closing { if let idle { finish(idle) } }
    for (wait, _) in closing { wait?.wait() }
  }

  /// Under the lock: marks a region closing. Returns what to wait on, and the
  /// id to finish at once (outside the lock) when no job is using it.
  private func beginClosing(_ s: inout State, _ id: UInt16) -> (DispatchSemaphore?, UInt16?) {
    guard let r = s.byID[id] else { return (nil, nil) }
    s.byToken[r.token] = nil
    if s.closing.contains(id) { return (s.drained[id], nil) }
    s.closing.insert(id)
    let sem = DispatchSemaphore(value: 0)
    s.drained[id] = sem
    return (sem, (s.inFlight[id] ?? 0) == 0 ? id : nil)
  }

  /// The last job of a closing region ended: detach it from every device and forget it.
  private func finish(_ id: UInt16) {
    let (attachments, sem) = state.withLock { s -> ([Attachment], DispatchSemaphore?) in
      let a = s.attached.removeValue(forKey: id) ?? []
      s.byID[id] = nil
      s.closing.remove(id)
      return (a, s.drained.removeValue(forKey: id))
    }
    for a in attachments { for q in a.queueIDs { a.host.detachRegion(queueID: q, region: id) } }
    sem?.signal()
  }
}

/// Why a local-lane request failed; mapped to a gRPC status in `StatusMapping`.
enum LocalLaneError: Error, Equatable {
  case notFound(String)
  case permissionDenied(String)
  case invalidArgument(String)
  case outOfRange(String)
  case failedPrecondition(String)
  case refused(String)
  case unavailable(String)

  var message: String {
    switch self {
    case .notFound(let m), .permissionDenied(let m), .invalidArgument(let m), .outOfRange(let m),
      .failedPrecondition(let m), .refused(let m), .unavailable(let m):
      m
    }
  }

  var rpcError: RPCError {
    switch self {
    case .notFound(let m): RPCError(code: .notFound, message: m)
    case .permissionDenied(let m): RPCError(code: .permissionDenied, message: m)
    case .invalidArgument(let m), .refused(let m): RPCError(code: .invalidArgument, message: m)
    case .outOfRange(let m): RPCError(code: .resourceExhausted, message: m)
    case .failedPrecondition(let m): RPCError(code: .failedPrecondition, message: m)
    case .unavailable(let m): RPCError(code: .unavailable, message: m)
    }
  }
}

/// The local lane's control socket: `register` (with the memfd passed by
/// SCM_RIGHTS) and `unregister`, as length-prefixed JSON frames (the framing
/// of the device's control channel; docs/LOCAL_LANE.md).
final class LocalControlServer: @unchecked Sendable {
  struct Request: Codable {
    var op: String
    /// register: the tenant's API key (the same as the gRPC calls'); ignored without a tenants file.
    var apiKey: String?
    /// register: bytes of the memfd to use.
    var size: UInt64?
    /// unregister: the token.
    var region: String?
    enum CodingKeys: String, CodingKey {
      case op, size, region
      case apiKey = "api_key"
    }
  }

  struct Response: Codable {
    var ok: Bool
    var error: String?
    var region: String?
    var size: UInt64?
    var tenant: String?
  }

  let path: String
  let registry: RegionRegistry
  let directory: TenantDirectory
  let logger: Logger
  private let listenFD: Int32
  private let running = Atomic<Bool>(true)

  init(path: String, registry: RegionRegistry, directory: TenantDirectory, logger: Logger) throws {
    unlink(path)
    // Owner and group may connect (0660): the socket is a local door to the gateway.
    let fd = accel_unix_listen(path, 0o660)
    guard fd >= 0 else { throw ConfigurationError("cannot listen on local control socket \(path): \(String(cString: strerror(accel_errno())))") }
    self.path = path
    self.listenFD = fd
    self.registry = registry
    self.directory = directory
    self.logger = logger
  }

  func start() {
    let t = Thread { [self] in
      while running.load(ordering: .relaxed) {
        let c = accel_unix_accept(listenFD)
        guard c >= 0 else {
          if !running.load(ordering: .relaxed) { return }
          continue
        }
        let worker = Thread { [self] in serve(ControlConnection(fd: c)) }
        worker.name = "accel-local-conn"
        worker.start()
      }
    }
    t.name = "accel-local-control"
    t.start()
  }

  func stop() {
    guard running.exchange(false, ordering: .relaxed) else { return }
    shutdown(listenFD, Int32(SHUT_RDWR))
    close(listenFD)
    unlink(path)
  }

  private func serve(_ conn: ControlConnection) {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
    _ = accel_peer_cred(conn.fd, &pid, &uid, &gid)
    defer {
      registry.unregisterAll(connection: conn.fd)
      conn.close()
    }
    while running.load(ordering: .relaxed) {
      let request: Request
      var fds: [Int32]
      do { (request, fds) = try conn.receive(Request.self) } catch { return }
      var reply = Response(ok: false)
      let tenant = directory.authenticate(authorization: request.apiKey.map { "Bearer \($0)" })
      switch request.op {
      case _ where tenant == nil:
        reply.error = request.apiKey == nil ? "missing api_key" : "unknown API key"
      case "register":
        guard fds.count == 1, let size = request.size else {
          reply.error = "register needs exactly one memfd (SCM_RIGHTS) and a size"
          break
        }
        let fd = fds.removeFirst()
        do {
          let r = try registry.register(fd: fd, size: size, tenant: tenant!.id, connection: conn.fd)
          reply = Response(ok: true, region: r.token, size: size, tenant: r.tenant)
          logger.info("local region registered", metadata: ["tenant": "\(r.tenant)", "bytes": "\(size)", "pid": "\(pid)"])
        } catch {
          reply.error = error.message
        }
      case "unregister":
        do {
          try registry.unregister(token: request.region ?? "", tenant: tenant!.id)
          reply = Response(ok: true, region: request.region)
        } catch {
          reply.error = error.message
        }
      default:
        reply.error = "unknown op \(request.op) (register, unregister)"
      }
      fds.forEach { _ = close($0) }
      do { try conn.send(reply) } catch { return }
    }
  }
}

/// A job's hold on the client memory it names: released when the last copy of
/// the job is dropped, which for a job abandoned on the device is when the
/// device completes it, so unregistering really waits for the device.
final class SpanHold: Sendable {
  let registry: RegionRegistry
  let bindings: [RegionRegistry.Binding]
  init(registry: RegionRegistry, bindings: [RegionRegistry.Binding]) {
    self.registry = registry
    self.bindings = bindings
  }
  deinit { for b in bindings { registry.unbind(b) } }
}

/// A request's local-lane spans, bound and checked.
struct LocalSpans {
  var input: ExternalSpan?
  var output: ExternalSpan?
  var hold: SpanHold?
  var isLocal: Bool { input != nil || output != nil }
  /// Bytes of input: the span's, or the inline payload's.
  var inputLength: Int

  /// Points `job` at the spans and makes it hold them.
  func apply(to job: inout JobRequest) {
    guard isLocal else { return }
    if let input {
      job.inputSpan = input
      job.input = Data()
      job.admissionBytes = Int(input.length)
    }
    if let output {
      job.outputSpan = output
      job.outputCapacity = Int(output.length)
    }
    job.retain = hold
  }
}

extension AcceleratorService {
  /// Resolves a request's `input_region` and `output_region` (either may be
  /// unset). Refuses what the lane cannot do with a clear status.
  func localSpans(
    input: Accelgate_V1_RegionSpan?, output: Accelgate_V1_RegionSpan?, inline: Int, tenant: String,
    operation: String, outputLimit: Int
  ) throws -> LocalSpans {
    guard input != nil || output != nil else { return LocalSpans(inputLength: inline) }
    guard let regions else {
      throw RPCError(
        code: .failedPrecondition,
        message: "\(operation): regions are only served on the local lane (start the gateway with --local-socket and call it there)")
    }
    if input != nil && inline > 0 {
      throw RPCError(code: .invalidArgument, message: "\(operation): set either the payload or input_region, not both")
    }
    var spans = LocalSpans(inputLength: inline)
    var bindings: [RegionRegistry.Binding] = []
    do {
      if let input {
        let (span, b) = try regions.bind(input, tenant: tenant, what: "input_region", maxLength: configuration.maxRequestBytes)
        bindings.append(b)
        spans.input = span
        spans.inputLength = Int(span.length)
      }
      if let output {
        let (span, b) = try regions.bind(output, tenant: tenant, what: "output_region", maxLength: outputLimit, clamp: true)
        bindings.append(b)
        spans.output = span
      }
    } catch {
      for b in bindings { regions.unbind(b) }
      throw error.rpcError
    }
    spans.hold = SpanHold(registry: regions, bindings: bindings)
    if let i = spans.input, let o = spans.output, i.region == o.region,
      i.length > 0, o.length > 0, i.offset < o.offset + UInt64(o.length), o.offset < i.offset + UInt64(i.length)
    {
      throw RPCError(
        code: .invalidArgument,
        message: "\(operation): input_region and output_region overlap; \(operation) cannot run in place")
    }
    return spans
  }
}
