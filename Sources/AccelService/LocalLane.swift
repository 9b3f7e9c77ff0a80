internal import AccelABI
internal import CAccelABI
internal import AccelDispatcher
internal import AccelDriver
internal import AccelRequests
internal import AccelMessages
internal import AccelScheduler
internal import CAccelSys
internal import Foundation
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
    /// The control connection it was passed on (a `ControlListener.Session` id).
    let connection: UInt64
    /// Descriptors it is charged for: the gateway's own and one per queue mapping.
    let descriptors: Int
    init(id: UInt16, token: String, tenant: String, size: UInt64, fd: Int32, connection: UInt64, descriptors: Int) {
      (self.id, self.token, self.tenant, self.size, self.fd, self.connection, self.descriptors) =
        (id, token, tenant, size, fd, connection, descriptors)
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

  /// What a tenant or a connection holds, against `LocalLaneQuotas`.
  struct Usage: Equatable {
    var regions = 0
    var bytes: UInt64 = 0
    var descriptors = 0
    mutating func add(_ r: Region, _ sign: Int) {
      regions += sign
      bytes = sign > 0 ? bytes + r.size : bytes - min(bytes, r.size)
      descriptors += sign * r.descriptors
    }
  }

  private struct State {
    var tenants: [String: Usage] = [:]
    var connections: [UInt64: Usage] = [:]
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
  let quotas: LocalLaneQuotas
  /// Regions one gateway holds at once (the ABI's id space).
  static let maxRegions = Int(ACCEL_EXT_REGION_MAX)

  init(dispatcher: Dispatcher, logger: Logger, quotas: LocalLaneQuotas = .defaults) {
    self.dispatcher = dispatcher
    self.logger = logger
    self.quotas = quotas
  }

  /// What `tenant` holds now (regions still used by calls after unregistering included).
  func usage(tenant: String) -> Usage { state.withLock { $0.tenants[tenant] ?? Usage() } }
  func usage(connection: UInt64) -> Usage { state.withLock { $0.connections[connection] ?? Usage() } }

  /// Descriptors a new mapping of a region costs: the gateway's own, one per queue.
  private var descriptorCost: Int { 1 + dispatcher.driver.queues.count }

  /// Under the lock: why one more region of `size` bytes costing `cost`
  /// descriptors would break a bound, or nil.
  private func quotaRefusal(_ s: State, tenant: String, connection: UInt64, size: UInt64, cost: Int) -> LocalLaneError? {
    let t = s.tenants[tenant] ?? Usage()
    let c = s.connections[connection] ?? Usage()
    let q = quotas
    func over(_ path: String, _ what: String) -> LocalLaneError { .quota(path, what) }
    if c.regions + 1 > q.connectionMaxRegions {
      return over("local.connection_max_regions", "this connection holds \(c.regions) regions, its limit")
    }
    if c.bytes + size > q.connectionMaxRegionBytes {
      return over(
        "local.connection_max_region_bytes",
        "this connection holds \(c.bytes) bytes of regions; \(size) more would pass its limit of \(q.connectionMaxRegionBytes)")
    }
    if c.descriptors + cost > q.connectionMaxDescriptors {
      return over(
        "local.connection_max_descriptors",
        "this connection's regions hold \(c.descriptors) descriptors; \(cost) more would pass its limit of \(q.connectionMaxDescriptors)")
    }
    if t.regions + 1 > q.tenantMaxRegions {
      return over("local.tenant_max_regions", "tenant \(tenant) holds \(t.regions) regions, its limit")
    }
    if t.bytes + size > q.tenantMaxRegionBytes {
      return over(
        "local.tenant_max_region_bytes",
        "tenant \(tenant) holds \(t.bytes) bytes of regions; \(size) more would pass its limit of \(q.tenantMaxRegionBytes)")
    }
    if t.descriptors + cost > q.tenantMaxDescriptors {
      return over(
        "local.tenant_max_descriptors",
        "tenant \(tenant)'s regions hold \(t.descriptors) descriptors; \(cost) more would pass its limit of \(q.tenantMaxDescriptors)")
    }
    return descriptorShortage(cost)
  }

  /// Whether `cost` more descriptors would eat into the reserve below RLIMIT_NOFILE.
  private func descriptorShortage(_ cost: Int) -> LocalLaneError? {
    let open = Int(accel_open_fd_count())
    let limit = Int(accel_fd_limit())
    guard open >= 0, limit > 0, open + cost + quotas.descriptorReserve > limit else { return nil }
    return .quota(
      "local.descriptor_reserve",
      "the gateway has \(open) of \(limit) descriptors open and keeps \(quotas.descriptorReserve) free for connections")
  }

  var count: Int { state.withLock { $0.byToken.count } }

  /// Regions held (registered, or unregistered and waiting for the calls using
  /// them), and spans of them bound by calls in progress (a call naming two regions holds two).
  var usage: (regions: Int, spansInUse: Int) {
    state.withLock { s in (s.byID.count, s.inFlight.values.reduce(0, +)) }
  }

  /// Registers `fd` (ownership passes here) for `tenant`, after checking its
  /// seal and size, and attaches it to every queue of the current device.
  /// Refuses (`.quota`) what would pass a bound of `LocalLaneQuotas`.
  func register(fd: Int32, size: UInt64, tenant: String, connection: UInt64) throws(LocalLaneError) -> Region {
    do { try ExternalRegion.check(fd: fd, claimedSize: size) } catch {
      close(fd)
      throw .refused(error.description)
    }
    let cost = descriptorCost
    let outcome = state.withLock { s -> Result<Region?, LocalLaneError> in
      if let refusal = quotaRefusal(s, tenant: tenant, connection: connection, size: size, cost: cost) {
        return .failure(refusal)
      }
      guard s.byID.count < Self.maxRegions else { return .success(nil) }
      var id = s.nextID
      while s.byID[id] != nil || s.closing.contains(id) { id = id >= UInt16(Self.maxRegions) ? 1 : id + 1 }
      s.nextID = id >= UInt16(Self.maxRegions) ? 1 : id + 1
      var random = [UInt8](repeating: 0, count: 16)
      for i in random.indices { random[i] = UInt8.random(in: 0...255) }
      let token = "r\(id)-" + random.map { String(format: "%02x", $0) }.joined()
      let r = Region(id: id, token: token, tenant: tenant, size: size, fd: fd, connection: connection, descriptors: cost)
      s.byToken[token] = r
      s.byID[id] = r
      s.tenants[tenant, default: Usage()].add(r, 1)
      s.connections[connection, default: Usage()].add(r, 1)
      return .success(r)
    }
    let region: Region
    switch outcome {
    case .failure(let refusal):
      close(fd)
      throw refusal
    case .success(nil):
      close(fd)
      throw .refused("this gateway holds \(Self.maxRegions) regions already")
    case .success(let r?):
      region = r
    }
    do { try attach(region, to: dispatcher.driver) } catch {
      state.withLock { s in
        s.byToken[region.token] = nil
        s.byID[region.id] = nil
        Self.forget(&s, region)
      }
      throw error
    }
    return region
  }

  /// Under the lock: takes a region's charge off its tenant and connection.
  private static func forget(_ s: inout State, _ r: Region) {
    s.tenants[r.tenant, default: Usage()].add(r, -1)
    if s.tenants[r.tenant]?.regions == 0 { s.tenants[r.tenant] = nil }
    s.connections[r.connection, default: Usage()].add(r, -1)
    if s.connections[r.connection]?.regions == 0 { s.connections[r.connection] = nil }
  }

  /// Maps the region into every queue of `driver`'s device (once per driver).
  private func attach(_ region: Region, to driver: DeviceDriver) throws(LocalLaneError) {
    let key = ObjectIdentifier(driver)
    if state.withLock({ s in s.attached[region.id]?.contains { $0.driver == key } == true }) { return }
    guard let host = driver.regionHost else { throw .unavailable("this device cannot map client memory") }
    if let shortage = descriptorShortage(driver.queues.count) { throw shortage }
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
  func unregisterAll(connection: UInt64) {
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
      if let r = s.byID.removeValue(forKey: id) { Self.forget(&s, r) }
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
  /// A bound of `LocalLaneQuotas` (its setting path) would be passed.
  case quota(String, String)

  var message: String {
    switch self {
    case .notFound(let m), .permissionDenied(let m), .invalidArgument(let m), .outOfRange(let m),
      .failedPrecondition(let m), .refused(let m), .unavailable(let m):
      m
    case .quota(let path, let m): "quota \(path): \(m)"
    }
  }

  /// The setting whose bound was reached, for `quota` refusals.
  var quotaPath: String? {
    if case .quota(let path, _) = self { return path }
    return nil
  }
}

/// The local lane's control socket: `register` (with the memfd passed by
/// SCM_RIGHTS) and `unregister`, as length-prefixed JSON frames (the framing
/// of the device's control channel; docs/LOCAL_LANE.md).
///
/// A connection is unauthenticated until its first request with a valid API
/// key; it then belongs to that key's tenant (requests with another tenant's
/// key are refused on it) and counts against `tenantMaxConnections`. Every
/// descriptor passed is closed unless a registration keeps it.
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
    /// The setting whose bound refused the request (`local.tenant_max_regions`, …).
    var quota: String?
  }

  let path: String
  let registry: RegionRegistry
  let directory: TenantDirectory
  let logger: Logger
  private let listener: ControlListener
  private let running = Atomic<Bool>(true)
  /// Authenticated control connections per tenant.
  private let tenantConnections = Mutex<[String: Int]>([:])

  init(path: String, registry: RegionRegistry, directory: TenantDirectory, logger: Logger) throws {
    unlink(path)
    // Owner and group may connect (0660): the socket is a local door to the gateway.
    let q = registry.quotas
    do {
      listener = try ControlListener(
        path: path, mode: 0o660,
        limits: ControlListener.Limits(maxUnauthenticated: q.maxUnauthenticatedConnections, frameTimeout: q.frameTimeout),
        name: "accel-local-control", log: { [logger] in logger.warning("\($0)") })
    } catch {
      throw ConfigurationError("cannot listen on local control socket \(path): \(error)")
    }
    self.path = path
    self.registry = registry
    self.directory = directory
    self.logger = logger
  }

  func start() {
    listener.start { [self] session in serve(session) }
  }

  func stop() {
    guard running.exchange(false, ordering: .relaxed) else { return }
    listener.stop()
  }

  /// Connections open, still unauthenticated, and closed to make room (for tests).
  var connectionCounts: (open: Int, unauthenticated: Int, evicted: UInt64) { listener.counts }

  private func serve(_ session: ControlListener.Session) {
    let conn = session.connection
    let pid = session.peer?.pid ?? 0
    var owner: String?
    defer {
      registry.unregisterAll(connection: session.id)
      if let owner { tenantConnections.withLock { $0[owner, default: 1] -= 1; if $0[owner] == 0 { $0[owner] = nil } } }
    }
    while running.load(ordering: .relaxed) {
      let request: Request
      var fds: [Int32]
      // receive closes what it received when it fails (EOF mid-frame, timeout, bad frame).
      do { (request, fds) = try session.receive(Request.self) } catch { return }
      var reply = Response(ok: false)
      var closeAfter = false
      let tenant = directory.authenticate(authorization: request.apiKey.map { "Bearer \($0)" })
      switch (tenant, owner) {
      case (nil, _):
        reply.error = request.apiKey == nil ? "missing api_key" : "unknown API key"
      case (let t?, nil):
        let admitted = tenantConnections.withLock { c -> Bool in
          guard c[t.id, default: 0] < registry.quotas.tenantMaxConnections else { return false }
          c[t.id, default: 0] += 1
          return true
        }
        if admitted {
          owner = t.id
          session.authenticated()
        } else {
          reply.error = "quota local.tenant_max_connections: tenant \(t.id) has \(registry.quotas.tenantMaxConnections) control connections open, its limit"
          reply.quota = "local.tenant_max_connections"
          closeAfter = true
        }
      case (let t?, let o?) where t.id != o:
        reply.error = "this connection belongs to another tenant; open one connection per tenant"
      default:
        break
      }
      if let owner, reply.error == nil {
        reply = handle(request, fds: &fds, tenant: owner, session: session, pid: pid)
      }
      // Whatever was passed and not kept by a registration is closed, on every path.
      fds.forEach { _ = close($0) }
      do { try conn.send(reply) } catch { return }
      if closeAfter { return }
    }
  }

  /// One authenticated request. Takes from `fds` only the descriptor a registration keeps.
  private func handle(_ request: Request, fds: inout [Int32], tenant: String, session: ControlListener.Session, pid: Int32)
    -> Response
  {
    var reply = Response(ok: false)
    switch request.op {
    case "register":
      guard fds.count == 1, let size = request.size else {
        reply.error = "register needs exactly one memfd (SCM_RIGHTS) and a size"
        break
      }
      do {
        let r = try registry.register(fd: fds.removeFirst(), size: size, tenant: tenant, connection: session.id)
        reply = Response(ok: true, region: r.token, size: size, tenant: r.tenant)
        logger.info("local region registered", metadata: ["tenant": "\(r.tenant)", "bytes": "\(size)", "pid": "\(pid)"])
      } catch {
        reply.error = error.message
        reply.quota = error.quotaPath
      }
    case "unregister":
      do {
        try registry.unregister(token: request.region ?? "", tenant: tenant)
        reply = Response(ok: true, region: request.region)
      } catch {
        reply.error = error.message
      }
    default:
      reply.error = "unknown op \(request.op) (register, unregister)"
    }
    return reply
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
  /// What the translator needs of the spans: their lengths.
  var lengths: SpanLengths { SpanLengths(input: input.map { Int($0.length) }, output: output.map { Int($0.length) }) }

  /// Points `job` at the spans and makes it hold them.
  func apply(to job: inout JobRequest) {
    guard isLocal else { return }
    if let input {
      job.input = .span(input)
      job.admissionBytes = Int(input.length)
    }
    if let output {
      job.output = .span(output)
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
      if let socket = localLaneSocket {
        throw RequestError.invalidArgument(
          "\(operation): region spans are served only on the local socket \(socket), not over TCP; make the call there or send the payload")
      }
      throw RequestError.failedPrecondition(
        "\(operation): regions are only served on the local lane (start the gateway with --local-socket and call it there)")
    }
    if input != nil && inline > 0 {
      throw RequestError.invalidArgument("\(operation): set either the payload or input_region, not both")
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
      throw StatusMapping.callStatus(error)
    }
    spans.hold = SpanHold(registry: regions, bindings: bindings)
    if let i = spans.input, let o = spans.output, i.region == o.region,
      i.length > 0, o.length > 0, i.offset < o.offset + UInt64(o.length), o.offset < i.offset + UInt64(i.length)
    {
      throw RequestError.invalidArgument("\(operation): input_region and output_region overlap; \(operation) cannot run in place")
    }
    return spans
  }
}
