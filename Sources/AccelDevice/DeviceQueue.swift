public import AccelABI
internal import CAccelABI
internal import Synchronization
internal import Glibc
internal import CAccelEngines

/// The device's side of one hardware queue: it consumes the SQ and produces the CQ.
///
/// The locks here are device-private (they model the device's internal
/// arbitration between its engines); nothing in shared memory is locked.
public final class DeviceQueue: @unchecked Sendable {
  public let region: QueueRegion
  let sqTail: SharedWord
  let sqHead: SharedWord
  let cqTail: SharedWord
  let cqHead: SharedWord
  let sqDoorbell: SharedWord
  let sqNeedWakeup: SharedWord
  let cqDoorbell: SharedWord
  let cqNeedWakeup: SharedWord
  let stateFlags: SharedWord
  let errorStatus: SharedWord
  let heartbeat: SharedWord64
  let completed: SharedWord64
  let errorCount: SharedWord64
  let resetRequest: SharedWord
  let resetAck: SharedWord
  /// Jobs handed out by `fetch` (under the fetch lock) and jobs given back
  /// (under the post lock: posting a completion, or `finishedWithoutPosting`).
  /// A reset waits until they are equal, so no engine still writes into buffers
  /// the driver is about to reuse. Plain counters under locks the job path takes
  /// anyway, rather than an atomic: no extra read-modify-write per job.
  private struct FetchState {
    var head: UInt32 = 0  // private copy of sq_head
    var fetchedJobs: UInt64 = 0
  }
  private struct PostState {
    var tail: UInt32 = 0  // private copy of cq_tail
    var finishedJobs: UInt64 = 0
    /// Completions dropped because the peer left the CQ full.
    var droppedCompletions: UInt64 = 0
  }

  private let fetchLock = Mutex(FetchState())
  private let postLock = Mutex(PostState())
  let weight: UInt32
  /// Open stream contexts (ABI 1.3), device-private, by 1-based slot.
  private let streams = Mutex<[UInt32: StreamContext]>([:])
  /// Client memory attached to this queue (ABI 1.4), by id. An engine holds a
  /// strong reference for the length of a job, so a detach never unmaps pages
  /// a job is still using.
  private let externals = Mutex<[UInt16: ExternalRegion]>([:])

  /// Attaches a client region under `id` (1...ACCEL_EXT_REGION_MAX). Replaces nothing: an id in use is refused.
  func attachExternal(_ region: ExternalRegion, id: UInt16) -> Bool {
    guard id >= 1, UInt32(id) <= ACCEL_EXT_REGION_MAX else { return false }
    return externals.withLock { table in
      guard table[id] == nil else { return false }
      table[id] = region
      return true
    }
  }

  /// Detaches region `id`; it is unmapped once no job holds it.
  @discardableResult
  func detachExternal(_ id: UInt16) -> Bool { externals.withLock { $0.removeValue(forKey: id) != nil } }

  func external(_ id: UInt16) -> ExternalRegion? { externals.withLock { $0[id] } }
  var externalCount: Int { externals.withLock { $0.count } }

  /// The comparison-mode eventfd doorbell (see `DeviceConfiguration.eventfdDoorbells`), or -1.
  let doorbellFD: Int32

  init(region: QueueRegion, doorbellFD: Int32 = -1) {
    self.region = region
    self.doorbellFD = doorbellFD
    region.header.pointee.stream_ctx_count = ACCEL_STREAM_CTX_MAX
    sqTail = SharedWord(region.field(\.sq_tail))
    sqHead = SharedWord(region.field(\.sq_head))
    cqTail = SharedWord(region.field(\.cq_tail))
    cqHead = SharedWord(region.field(\.cq_head))
    sqDoorbell = SharedWord(region.field(\.sq_doorbell))
    sqNeedWakeup = SharedWord(region.field(\.sq_need_wakeup))
    cqDoorbell = SharedWord(region.field(\.cq_doorbell))
    cqNeedWakeup = SharedWord(region.field(\.cq_need_wakeup))
    stateFlags = SharedWord(region.field(\.state_flags))
    errorStatus = SharedWord(region.field(\.error_status))
    heartbeat = SharedWord64(region.field64(\.heartbeat))
    completed = SharedWord64(region.field64(\.completed))
    errorCount = SharedWord64(region.field64(\.error_count))
    resetRequest = SharedWord(region.field(\.reset_request))
    resetAck = SharedWord(region.field(\.reset_ack))
    weight = max(1, region.header.pointee.weight)
  }

  deinit { if doorbellFD >= 0 { _ = Glibc.close(doorbellFD) } }

  public var id: UInt32 { region.queueID }

  public var state: QueueState {
    let f = stateFlags.loadAcquire()
    if f & ACCEL_QF_ISOLATED != 0 { return .isolated }
    if f & ACCEL_QF_STOPPED != 0 { return .stopped }
    if f & ACCEL_QF_ERROR != 0 { return .error }
    return .running
  }

  public var completedCount: UInt64 { completed.loadAcquire() }

  var hasPendingWork: Bool {
    stateFlags.loadAcquire() & ACCEL_QF_STOPPED == 0 && sqTail.loadAcquire() != sqHead.loadRelaxed()
  }

  /// Descriptors published and not yet taken; never more than the ring holds,
  /// whatever the driver wrote (a bad index is `fetch`'s to report).
  var waitingDescriptors: UInt32 {
    guard stateFlags.loadAcquire() & ACCEL_QF_STOPPED == 0 else { return 0 }
    let waiting = sqTail.loadAcquire() &- sqHead.loadRelaxed()
    return region.sqIndex.isConsistent(head: 0, tail: waiting) ? waiting : 0
  }

  /// Whether the queue runs jobs (not in error, not isolated). A queue that does
  /// not still drains its ring, completing each job with QUEUE_STOPPED unrun.
  var isRunnable: Bool { stateFlags.loadAcquire() & (ACCEL_QF_ERROR | ACCEL_QF_ISOLATED) == 0 }

  /// Takes the next job — one descriptor, or a chain of up to `ACCEL_CHAIN_MAX` —
  /// copied out of shared memory. Nil when the ring is empty or the queue is
  /// stopped. A producer index that is impossible marks the queue in error.
  /// A chain cut short (the ring ends, or it is too long) is returned as is;
  /// the engine fails it with BAD_PARAMS. Every job returned must be given
  /// back by `post` or `finishedWithoutPosting`.
  func fetch() -> [accel_sqe]? {
    guard stateFlags.loadAcquire() & ACCEL_QF_STOPPED == 0 else { return nil }
    return fetchLock.withLock { state -> [accel_sqe]? in
      var head = state.head
      defer { state.head = head }
      let tail = sqTail.loadAcquire()
      if tail == head { return nil }
      guard region.sqIndex.isConsistent(head: head, tail: tail) else {
        // The driver's index cannot be trusted: skip to it and wait for a reset.
        _ = markError(.invalidDescriptor)
        head = tail
        sqHead.storeRelease(head)
        return nil
      }
      var chain = [region.sqe(at: head).pointee]
      head &+= 1
      while chain.last!.flags & UInt8(ACCEL_SQE_F_CHAIN) != 0 && chain.count < Int(ACCEL_CHAIN_MAX) && head != tail {
        chain.append(region.sqe(at: head).pointee)
        head &+= 1
      }
      sqHead.storeRelease(head)
      state.fetchedJobs &+= 1
      return chain
    }
  }

  /// The context for a stream chunk: opened (or reopened) on STREAM_START, else the
  /// open one. Nil when the slot is not open (never opened, or closed by a reset),
  /// or when another chunk of the stream is on an engine right now.
  func streamContext(_ sqe: accel_sqe) -> StreamContext? {
    let slot = sqe.stream_ctx
    return streams.withLock { table -> StreamContext? in
      if sqe.flags & UInt8(ACCEL_SQE_F_STREAM_START) != 0 {
        guard table[slot]?.busy != true,
          let raw = accel_stream_create(sqe.algorithm, sqe.opcode == DeviceOpcode.compress.rawValue ? 1 : 0, sqe.level)
        else { return nil }
        table[slot] = StreamContext(raw, compress: sqe.opcode == DeviceOpcode.compress.rawValue, algorithm: sqe.algorithm)
      }
      guard let ctx = table[slot], !ctx.busy, ctx.algorithm == sqe.algorithm,
        ctx.compress == (sqe.opcode == DeviceOpcode.compress.rawValue)
      else { return nil }
      ctx.busy = true
      return ctx
    }
  }

  /// A chunk finished: closes the context at the stream's end or on an error.
  func streamChunkDone(_ slot: UInt32, _ ctx: StreamContext, close: Bool) {
    streams.withLock { table in
      ctx.busy = false
      if close, table[slot] === ctx { table[slot] = nil }
    }
  }

  /// Completions dropped because the peer never made room in the CQ.
  public var droppedCompletionCount: UInt64 { postLock.withLock { $0.droppedCompletions } }

  /// Open streams (for tests and DescribeDevice).
  var openStreams: Int { streams.withLock { $0.count } }

  /// The engine is done with a job `fetch` gave it and posts no completion for it.
  func finishedWithoutPosting() { postLock.withLock { $0.finishedJobs &+= 1 } }

  /// Carries out a reset the driver asked for, if one is pending and no engine
  /// holds a job of this queue: discards unfetched descriptors, clears the error
  /// flag and acknowledges. Isolation is the device's to lift, not a reset's.
  /// - Returns: nil when there was nothing to do (or it must wait), else whether
  ///   the queue was in error when reset (if not, the driver found the fault).
  func serviceReset() -> Bool? {
    let request = resetRequest.loadAcquire()
    guard request != resetAck.loadRelaxed() else { return nil }
    return fetchLock.withLock { state -> Bool? in
      guard request != resetAck.loadRelaxed(), postLock.withLock({ $0.finishedJobs }) == state.fetchedJobs else {
        return nil
      }
      let wasInError = stateFlags.loadAcquire() & ACCEL_QF_ERROR != 0
      state.head = sqTail.loadAcquire()
      sqHead.storeRelease(state.head)
      stateFlags.fetchAnd(~ACCEL_QF_ERROR)
      errorStatus.storeRelease(0)
      streams.withLock { $0.removeAll() }  // a reset closes every stream of the queue
      resetAck.storeRelease(request)
      return wasInError
    }
  }

  /// Longest an engine waits for room in a full completion ring (ns). A driver
  /// keeps at most CQ-size jobs in flight, so the ring is never full unless the
  /// peer stopped reaping or wrote an impossible `cq_head`.
  static let postTimeoutNanoseconds: UInt64 = 50_000_000

  /// Posts a completion. The driver bounds its in-flight jobs by the CQ size,
  /// so the ring is never full in normal operation. If it is, the engine waits
  /// (briefly spinning, then sleeping) at most `postTimeoutNanoseconds`; then,
  /// or at once when the queue is already in error, it drops the completion and
  /// puts the queue in error, so a peer that never reaps (or plays games with
  /// `cq_head`, which it owns) stalls only its own queue, never an engine.
  func post(_ cqe: accel_cqe, isRunning: () -> Bool) {
    let posted = postLock.withLock { state -> Bool in
      state.finishedJobs &+= 1
      var tail = state.tail
      defer { state.tail = tail }
      var spins = 0
      var deadline: UInt64 = 0
      while region.cqIndex.isFull(head: cqHead.loadAcquire(), tail: tail) {
        guard isRunning(), stateFlags.loadAcquire() & ACCEL_QF_ERROR == 0 else { return false }
        spins += 1
        if spins < 1000 {
          SharedMemory.cpuRelax()
          continue
        }
        let now = SharedMemory.nowNanoseconds()
        if deadline == 0 { deadline = now &+ Self.postTimeoutNanoseconds }
        if now >= deadline {
          markError(.invalidDescriptor)
          state.droppedCompletions &+= 1
          return false
        }
        SharedMemory.sleep(nanoseconds: 50_000)
      }
      region.cqe(at: tail).pointee = cqe
      tail &+= 1
      cqTail.storeRelease(tail)
      return true
    }
    guard posted else { return }
    completed.fetchAdd(1)
    SharedMemory.fence()
    if cqNeedWakeup.loadAcquire() != 0 {
      cqDoorbell.fetchAdd(1)
      cqDoorbell.wake()
    }
  }

  /// Stops the queue: engines take no more descriptors from it.
  func stop() { stateFlags.fetchOr(ACCEL_QF_STOPPED) }

  /// Puts the queue in error. - Returns: true if it was not in error before.
  @discardableResult
  func markError(_ status: DeviceStatus) -> Bool {
    errorCount.fetchAdd(1)
    if stateFlags.fetchOr(ACCEL_QF_ERROR) & ACCEL_QF_ERROR == 0 {
      errorStatus.storeRelease(UInt32(status.rawValue))
      return true
    }
    return false
  }

  func setIsolated(_ on: Bool) {
    if on { stateFlags.fetchOr(ACCEL_QF_ISOLATED) } else { stateFlags.fetchAnd(~ACCEL_QF_ISOLATED) }
  }
}

/// One open stream's engine state. Guarded by the queue's stream table lock,
/// except `raw`, which only the engine holding the context (`busy`) touches.
final class StreamContext: @unchecked Sendable {
  let raw: OpaquePointer
  let compress: Bool
  let algorithm: UInt8
  var busy = false
  init(_ raw: OpaquePointer, compress: Bool, algorithm: UInt8) {
    self.raw = raw
    self.compress = compress
    self.algorithm = algorithm
  }
  deinit { accel_stream_destroy(raw) }
}

/// What the device's queue state flags say.
public enum QueueState: String, Sendable {
  case running, error, stopped, isolated
}
