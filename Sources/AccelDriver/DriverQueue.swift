package import AccelABI
internal import CAccelABI
internal import Synchronization
internal import CAccelSys

/// Resources one job holds on a queue between reservation and release:
/// a completion slot, its buffers in the data pool and, for keyed jobs, a key slot.
package struct Lease: Sendable {
  package let queueIndex: Int
  package let slot: Int
  package let cookie: UInt64
  package let srcOffset: UInt64
  package let srcLength: UInt32
  /// Leading bytes of the input buffer the device skips (a staged payload
  /// whose first bytes are not the job's input, e.g. a key envelope's header).
  /// The buffer is still allocated and freed whole (`srcOffset`, `srcLength`).
  package var srcSkip: UInt32 = 0
  package let dstOffset: UInt64
  package let dstCapacity: UInt32
  /// Parameter block (AEAD nonce and AAD); length 0 when none.
  package var auxOffset: UInt64 = 0
  package var auxLength: UInt32 = 0
  /// Intermediate buffer between the two steps of a chain; capacity 0 when none.
  package var midOffset: UInt64 = 0
  package var midCapacity: UInt32 = 0
  /// 1-based key slot, 0 when none.
  package var keySlot: UInt32 = 0
  /// Buffers held secrets or plaintext: zeroed on release.
  package var sensitive = false
  /// ABI 1.4: the input or output lies in an attached external region (a
  /// client's memory), not in the pool; 0 = the pool.
  package var srcRegion: UInt16 = 0
  package var dstRegion: UInt16 = 0
}

/// A buffer in a client's memory attached to the queues as external region `region` (ABI 1.4).
package struct ExternalSpan: Sendable, Equatable {
  package var region: UInt16
  package var offset: UInt64
  package var length: UInt32
  package init(region: UInt16, offset: UInt64, length: UInt32) {
    self.region = region
    self.offset = offset
    self.length = length
  }
}

/// One step of a device job. A job of two steps is submitted as a descriptor
/// chain: the first writes the lease's intermediate buffer, the second reads it.
package struct DeviceStep: Sendable, Equatable {
  package var opcode: DeviceOpcode
  package var algorithm: DeviceAlgorithm
  package var level: UInt8
  /// Compress-and-verify (compression steps only).
  package var verify = false
  /// A chunk of the stream in this 1-based context (ABI 1.3); 0 = not a stream.
  package var streamSlot: UInt32 = 0
  package var streamStart = false
  package var streamFinal = false
  package init(_ opcode: DeviceOpcode, _ algorithm: DeviceAlgorithm, level: UInt8 = 0, verify: Bool = false) {
    self.opcode = opcode
    self.algorithm = algorithm
    self.level = level
    self.verify = verify
  }
  var isCrypto: Bool { opcode == .encrypt || opcode == .decrypt || opcode == .digest }
}

/// A completion as the driver delivers it, after validation.
package struct Completion: Sendable {
  package var status: DeviceStatus
  package var produced: UInt32
  package var consumed: UInt32
  package var engineID: UInt16
  package var engineNanoseconds: UInt64
  /// Why the driver failed the job itself (no completion, a malformed one, the device gone).
  package var detail: String? = nil

  static func failed(_ status: DeviceStatus, _ detail: String, engine: UInt16 = 0) -> Completion {
    Completion(status: status, produced: 0, consumed: 0, engineID: engine, engineNanoseconds: 0, detail: detail)
  }
}

/// Where a queue stands in the driver's error recovery (ABI 1.2 reset protocol).
package enum QueueService: Sendable, Equatable {
  /// Takes new jobs (if the device's flags allow).
  case inService
  /// Faulted: takes no new jobs; waits for its in-flight jobs to come back.
  case draining(reason: String)
  /// Asked the device for reset number `request` at `since` (ns); waits for the acknowledgement.
  case awaitingReset(request: UInt32, reason: String, since: UInt64)
  /// Beyond recovery (corrupt completion ring, device gone, or a device too old to reset).
  case dead(reason: String)

  package var reason: String? {
    switch self {
    case .inService: nil
    case .draining(let r), .awaitingReset(_, let r, _), .dead(let r): r
    }
  }
}

/// Called on the reaper thread once per validated completion. Must not block.
package typealias CompletionHandler = @Sendable (Completion) -> Void

/// The driver's side of one hardware queue: buffer pool, completion slots,
/// submission (SQ producer) and reaping (CQ consumer).
package final class DriverQueue: @unchecked Sendable {
  package let index: Int
  package let region: QueueRegion
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
  let resetRequest: SharedWord
  let resetAck: SharedWord

  private enum SlotState {
    case free
    /// On the device since `since` (monotonic ns).
    case inFlight(generation: UInt32, lease: Lease, handler: CompletionHandler, since: UInt64)
    /// Completed and delivered; the owner still holds the buffers.
    case completed(generation: UInt32)
    /// Failed by the driver (no completion in time) while the device may still
    /// run it: its owner was answered, but the buffers, and whatever keeps the
    /// memory they name alive, are held until the device acknowledges a reset.
    case abandoned(generation: UInt32)
  }

  private struct State {
    var pool: PoolAllocator
    var slots: [SlotState]
    var freeSlots: [Int]
    var freeKeySlots: [UInt32]
    var generation: UInt32 = 0
    /// Driver's private copy of sq_tail.
    var tail: UInt32 = 0
    var leased = 0
    /// SQ entries the leases will take: one per job, two per chain. A lease's
    /// entries stay counted until it is released (after its completion, so after
    /// the device fetched them), and their sum never passes `sq_entries`: a
    /// descriptor is never written over one the device has not fetched yet
    /// (issue 17, finding 13).
    var descriptorsHeld = 0
    var service = QueueService.inService
    var freeStreams: [UInt32] = []
    /// Staged payloads (network lane) may only lie at or above this offset:
    /// the top of the pool is the staging zone; the end of the pool = no zone.
    var stagingFloor: UInt64
    /// Pool bytes held by staged payloads not yet taken by a lease.
    var stagedBytes: UInt64 = 0
    /// Staged payloads taken by a lease, by completion slot: settled when the lease is released.
    var stagedLeases: [Int: StagedInput] = [:]
    /// Released leases of abandoned jobs, kept (with what their owners asked to
    /// keep alive: a client region's hold) until the device can no longer touch them.
    var parked: [(lease: Lease, keepAlive: (any AnyObject & Sendable)?)] = []
  }

  private let state: Mutex<State>
  /// Serialises reaping; only the reaper thread takes it, except in tests.
  private let reapLock = Mutex<UInt32>(0)  // private copy of cq_head
  private let counters = Counters()
  /// Comparison mode for benchmarks only: an eventfd written for every job,
  /// whether or not an engine sleeps, instead of the adaptive doorbell that
  /// wakes only when `sq_need_wakeup` is set. Nil in normal operation.
  package let perJobDoorbell: Int32?
  /// Set while the queue is out of the driver's service (draining, resetting or dead).
  /// Mirrors `State.service` for the lock-free health check.
  private let outOfService = Atomic<Bool>(false)
  /// Coarse monotonic time (ns) for in-flight timestamps, advanced by `maintain`:
  /// a job's start is known to within one maintenance interval, which is plenty
  /// for a timeout of seconds and keeps a clock read off the per-job path.
  private let coarseNow = Atomic<UInt64>(0)
  /// Set while a reset the driver asked for is overdue (the device has not
  /// acknowledged it within the completion timeout, e.g. its engine hangs):
  /// jobs should not wait for this queue.
  private let resetOverdue = Atomic<Bool>(false)
  /// Set when the queue can never be used again (its completion ring is corrupt or the device is gone).
  private let faulted = Atomic<Bool>(false)

  package init(index: Int, region: QueueRegion, perJobDoorbell: Int32? = nil) {
    self.index = index
    self.perJobDoorbell = perJobDoorbell
    self.region = region
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
    resetRequest = SharedWord(region.field(\.reset_request))
    resetAck = SharedWord(region.field(\.reset_ack))
    let layout = region.layout
    let slots = Int(layout.sqEntries)
    let startTail = SharedWord(region.field(\.sq_tail)).loadAcquire()
    let startHead = SharedWord(region.field(\.cq_head)).loadAcquire()
    state = Mutex(
      State(
        pool: PoolAllocator(base: layout.dataOffset, capacity: layout.dataSize, alignment: UInt64(ACCEL_BUFFER_ALIGN)),
        slots: Array(repeating: .free, count: slots),
        freeSlots: Array((0..<slots).reversed()),
        freeKeySlots: layout.keySlotCount > 0 ? Array((1...layout.keySlotCount).reversed()) : [],
        tail: startTail,
        freeStreams: Self.streamSlots(region), stagingFloor: layout.dataOffset + layout.dataSize))
    reapLock.withLock { $0 = startHead }
    coarseNow.store(SharedMemory.nowNanoseconds(), ordering: .relaxed)
  }

  private static func streamSlots(_ region: QueueRegion) -> [UInt32] {
    let n = min(region.header.pointee.stream_ctx_count, ACCEL_STREAM_CTX_MAX)
    return n > 0 ? Array((1...n).reversed()) : []
  }

  /// Takes a stream context (1-based), or nil if all are open.
  package func openStream() -> UInt32? { state.withLock { $0.freeStreams.popLast() } }

  /// Gives a stream context back.
  package func closeStream(_ slot: UInt32) { state.withLock { $0.freeStreams.append(slot) } }

  /// Stream contexts the device offers on this queue, and how many are open now.
  package var streamContexts: (total: Int, open: Int) {
    let total = Int(min(region.header.pointee.stream_ctx_count, ACCEL_STREAM_CTX_MAX))
    return (total, total - state.withLock { $0.freeStreams.count })
  }

  package var queueID: UInt32 { region.queueID }
  /// Arbitration weight the device gave this queue.
  package var weight: UInt32 { max(1, region.header.pointee.weight) }
  package var poolCapacity: UInt64 { region.layout.dataSize }
  package var slotCount: Int { Int(region.layout.sqEntries) }
  package var isHealthy: Bool {
    !outOfService.load(ordering: .relaxed)
      && stateFlags.loadAcquire() & (ACCEL_QF_ERROR | ACCEL_QF_STOPPED | ACCEL_QF_ISOLATED) == 0
  }

  /// Whether the queue can come back into service by itself (a reset), as
  /// opposed to being dead or on an isolated device.
  package var mayRecover: Bool {
    !faulted.load(ordering: .relaxed) && !resetOverdue.load(ordering: .relaxed)
      && stateFlags.loadAcquire() & (ACCEL_QF_STOPPED | ACCEL_QF_ISOLATED) == 0
  }

  /// Where the queue stands in error recovery.
  package var service: QueueService { state.withLock { $0.service } }

  /// The device's flags for this queue, as text ("running", "error", "isolated"…).
  package var deviceState: String {
    let f = stateFlags.loadAcquire()
    if f & ACCEL_QF_ISOLATED != 0 { return "isolated" }
    if f & ACCEL_QF_STOPPED != 0 { return "stopped" }
    if f & ACCEL_QF_ERROR != 0 { return "error" }
    return "running"
  }

  /// Jobs holding a slot (in flight or awaiting release).
  package var leasedCount: Int { state.withLock { $0.leased } }
  package var poolFreeBytes: UInt64 { state.withLock { $0.pool.freeBytes } }

  /// The bytes a pool allocation of `size` really takes.
  package func poolFootprint(_ size: UInt64) -> UInt64 { state.withLock { $0.pool.rounded(size) } }

  /// Reserves a completion slot, buffers and (when `key` is given) a key slot for
  /// one job, or nil if the queue has no room. The key is copied into the key
  /// slot here, and zeroed there on release.
  ///
  /// With `stagedInput` (network lane) the job's input is that staged payload,
  /// already in this queue's pool: the lease takes the buffer over (it is freed
  /// with the lease) and `srcLength` is ignored; `srcSkip` leading bytes of it
  /// are not given to the device.
  package func reserve(
    srcLength: UInt32, dstCapacity: UInt32, auxLength: UInt32 = 0, midCapacity: UInt32 = 0,
    key: SecretBytes? = nil, sensitive: Bool = false, srcExternal: ExternalSpan? = nil, dstExternal: ExternalSpan? = nil,
    stagedInput: StagedInput? = nil, srcSkip: UInt32 = 0,
    handler: @escaping CompletionHandler
  ) -> Lease? {
    precondition((key?.count ?? 0) <= CryptoSizing.maxKeyLength)
    if let stagedInput { precondition(stagedInput.queue === self && srcSkip <= stagedInput.length, "staged elsewhere") }
    let lease = state.withLock { s -> Lease? in
      let descriptors = midCapacity > 0 ? 2 : 1
      guard let slot = s.freeSlots.last, key == nil || !s.freeKeySlots.isEmpty,
        s.descriptorsHeld + descriptors <= Int(region.layout.sqEntries)
      else { return nil }
      var taken: [(UInt64, UInt64)] = []
      func take(_ n: UInt32) -> UInt64? {
        guard let o = s.pool.allocate(UInt64(n)) else { return nil }
        taken.append((o, UInt64(n)))
        return o
      }
      // External buffers take nothing from the pool; a staged input is already in it.
      guard let src = stagedInput.map({ $0.offset }) ?? srcExternal.map({ $0.offset }) ?? take(srcLength),
        let dst = dstExternal.map({ $0.offset }) ?? take(dstCapacity),
        let aux = auxLength > 0 ? take(auxLength) : 0, let mid = midCapacity > 0 ? take(midCapacity) : 0,
        stagedInput?.adopt() ?? true
      else {
        for (o, n) in taken { s.pool.release(offset: o, size: n) }
        return nil
      }
      if let stagedInput {
        s.stagedBytes -= s.pool.rounded(UInt64(stagedInput.length))
        s.stagedLeases[slot] = stagedInput
      }
      s.freeSlots.removeLast()
      s.descriptorsHeld += descriptors
      s.generation &+= 1
      let gen = s.generation
      let srcLength = stagedInput.map { UInt32($0.length) } ?? srcExternal?.length ?? srcLength
      var lease = Lease(
        queueIndex: index, slot: slot, cookie: UInt64(gen) << 32 | UInt64(slot),
        srcOffset: src, srcLength: srcLength, dstOffset: dst,
        dstCapacity: dstExternal?.length ?? dstCapacity)
      lease.srcRegion = srcExternal?.region ?? 0
      lease.dstRegion = dstExternal?.region ?? 0
      lease.auxOffset = auxLength > 0 ? aux : 0
      lease.auxLength = auxLength
      lease.midOffset = midCapacity > 0 ? mid : 0
      lease.midCapacity = midCapacity
      lease.sensitive = sensitive || key != nil
      if let key {
        let ks = s.freeKeySlots.removeLast()
        lease.keySlot = ks
        let p = region.bytes(at: region.layout.keySlot(ks)!).assumingMemoryBound(to: accel_key_slot.self)
        p.pointee.length = UInt32(key.count)
        p.pointee.flags = 0
        key.withBytes { b in
          if let base = b.baseAddress { region.bytes(at: region.layout.keySlot(ks)! + 8).copyMemory(from: base, byteCount: b.count) }
        }
      }
      lease.srcSkip = stagedInput != nil ? srcSkip : 0
      s.slots[slot] = .inFlight(generation: gen, lease: lease, handler: handler, since: coarseNow.load(ordering: .relaxed))
      s.leased += 1
      return lease
    }
    return lease
  }

  // MARK: network-lane staging

  /// Sets the staging zone: the top `bytes` of the pool (rounded down to the
  /// allocation unit), the only place `stageInput` may put payloads. 0 turns
  /// staging off. Payloads already staged stay where they are.
  package func setStagingZone(bytes: UInt64) {
    state.withLock { s in
      let end = s.pool.base + s.pool.capacity
      let zone = min(bytes, s.pool.capacity) & ~(s.pool.alignment - 1)
      s.stagingFloor = end - zone
    }
  }

  /// Size of the staging zone in bytes (0: staging off).
  package var stagingZoneBytes: UInt64 { state.withLock { $0.pool.base + $0.pool.capacity - $0.stagingFloor } }

  /// Pool bytes held by staged payloads that no lease has taken yet.
  package var stagedBytes: UInt64 { state.withLock { $0.stagedBytes } }

  /// Takes a buffer of `length` bytes in the staging zone for a payload that
  /// will be this queue's job input (network lane: the gRPC layer decodes the
  /// payload straight into it, before the scheduler has seen the job). Nil when
  /// the zone has no room, staging is off, or the queue is out of service.
  ///
  /// The buffer is freed by `StagedInput.release` (or when the object goes), or
  /// taken over by the lease of a `reserve(stagedInput:)` and freed with it.
  /// `onSettle` runs once, when the buffer is freed either way (outside this
  /// queue's lock).
  package func stageInput(length: Int, sensitive: Bool, onSettle: @escaping @Sendable (Int) -> Void = { _ in })
    -> StagedInput?
  {
    guard length > 0, length <= Int(UInt32.max), isHealthy else { return nil }
    let offset = state.withLock { s -> UInt64? in
      guard case .inService = s.service, let o = s.pool.allocateHigh(UInt64(length), floor: s.stagingFloor) else {
        return nil
      }
      s.stagedBytes += s.pool.rounded(UInt64(length))
      return o
    }
    return offset.map { StagedInput(queue: self, offset: $0, length: length, sensitive: sensitive, onSettle: onSettle) }
  }

  /// Frees a staged buffer no lease took (zeroed first if it held secrets).
  fileprivate func releaseStaged(offset: UInt64, length: Int, sensitive: Bool) {
    if sensitive { SharedMemory.secureZero(region.bytes(at: offset), count: length) }
    state.withLock { s in
      s.pool.release(offset: offset, size: UInt64(length))
      s.stagedBytes -= s.pool.rounded(UInt64(length))
    }
  }

  /// Frees a lease's buffers, key slot and completion slot, or parks them if
  /// the job was abandoned while the device may still run it (see
  /// `SlotState.abandoned`): then they, and `keepAlive`, are let go once the
  /// device acknowledges the queue's reset (issue 17, finding 10).
  /// Sensitive leases have every buffer and the key slot zeroed first.
  package func release(_ lease: Lease, keepAlive: (any AnyObject & Sendable)? = nil) {
    let parked = state.withLock { s -> Bool in
      guard lease.slot < s.slots.count, case .abandoned = s.slots[lease.slot] else { return false }
      s.parked.append((lease, keepAlive))
      return true
    }
    if !parked { free(lease) }
  }

  /// Lets go of parked leases: the device will never touch their buffers again.
  private func unpark() {
    let parked = state.withLock { s in
      defer { s.parked.removeAll() }
      return s.parked
    }
    for p in parked { free(p.lease) }
  }

  private func free(_ lease: Lease) {
    if lease.sensitive {
      // Pool buffers only: a client's own memory is the client's to clear.
      for (o, n) in [
        (lease.srcOffset, lease.srcRegion == 0 ? lease.srcLength : 0),
        (lease.dstOffset, lease.dstRegion == 0 ? lease.dstCapacity : 0), (lease.auxOffset, lease.auxLength),
        (lease.midOffset, lease.midCapacity),
      ] where n > 0 {
        SharedMemory.secureZero(region.bytes(at: o), count: Int(n))
      }
      if let ks = region.layout.keySlot(lease.keySlot) {
        SharedMemory.secureZero(region.bytes(at: ks), count: Int(ACCEL_KEYSLOT_SIZE))
      }
    }
    let staged = state.withLock { s in
      if lease.srcRegion == 0 { s.pool.release(offset: lease.srcOffset, size: UInt64(lease.srcLength)) }
      if lease.dstRegion == 0 { s.pool.release(offset: lease.dstOffset, size: UInt64(lease.dstCapacity)) }
      if lease.auxLength > 0 { s.pool.release(offset: lease.auxOffset, size: UInt64(lease.auxLength)) }
      if lease.midCapacity > 0 { s.pool.release(offset: lease.midOffset, size: UInt64(lease.midCapacity)) }
      if lease.keySlot != 0 { s.freeKeySlots.append(lease.keySlot) }
      s.slots[lease.slot] = .free
      s.freeSlots.append(lease.slot)
      s.leased -= 1
      s.descriptorsHeld -= lease.midCapacity > 0 ? 2 : 1
      return s.stagedLeases.removeValue(forKey: lease.slot)
    }
    staged?.settle()
  }

  /// Makes a completed lease submittable again with the same buffers and cookie
  /// (for benchmarks that measure the ring without the allocator).
  package func rearm(_ lease: Lease, handler: @escaping CompletionHandler) {
    state.withLock { s in
      if case .completed(let gen) = s.slots[lease.slot], UInt64(gen) == lease.cookie >> 32 {
        s.slots[lease.slot] = .inFlight(generation: gen, lease: lease, handler: handler, since: coarseNow.load(ordering: .relaxed))
      }
    }
  }

  /// Pointer to a lease's parameter block, for the caller to fill before submit.
  package func aux(_ lease: Lease) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(start: region.bytes(at: lease.auxOffset), count: Int(lease.auxLength))
  }

  /// Pointer to a lease's input buffer, for the caller to fill before submit.
  package func input(_ lease: Lease) -> UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(start: region.bytes(at: lease.srcOffset), count: Int(lease.srcLength))
  }

  /// Pointer to a lease's output, valid until release.
  package func output(_ lease: Lease, count: Int) -> UnsafeRawBufferPointer {
    UnsafeRawBufferPointer(start: region.bytes(at: lease.dstOffset), count: min(count, Int(lease.dstCapacity)))
  }

  /// Writes the descriptors of a batch and publishes them with one tail store.
  /// Rings the doorbell (one futex wake) only if an engine is parked.
  /// Leases always fit: their SQ entries together never pass `sq_entries` (`descriptorsHeld`).
  /// - Returns: true if a wake syscall was made.
  @discardableResult
  package func submit(_ batch: [(lease: Lease, steps: [DeviceStep])]) -> Bool {
    guard !batch.isEmpty else { return false }
    state.withLock { s in
      var tail = s.tail
      for job in batch {
        for i in job.steps.indices {
          // Written straight into the ring slot: no intermediate array per job.
          region.sqe(at: tail).pointee = Self.descriptor(job.lease, job.steps, step: i)
          tail &+= 1
        }
      }
      s.tail = tail
      sqTail.storeRelease(tail)
    }
    counters.submitted.add(UInt64(batch.count), ordering: .relaxed)
    counters.descriptors.add(UInt64(batch.reduce(0) { $0 + $1.steps.count }), ordering: .relaxed)
    counters.batches.add(1, ordering: .relaxed)
    SharedMemory.fence()
    if let fd = perJobDoorbell {
      for _ in batch { _ = accel_eventfd_ring(fd) }
      counters.wakes.add(UInt64(batch.count), ordering: .relaxed)
      return true
    }
    if sqNeedWakeup.loadAcquire() != 0 {
      sqDoorbell.fetchAdd(1)
      sqDoorbell.wake()
      counters.wakes.add(1, ordering: .relaxed)
      return true
    }
    return false
  }

  /// Descriptor `step` of one job: a single SQE, or a chain src → mid → dst.
  static func descriptor(_ lease: Lease, _ steps: [DeviceStep], step i: Int) -> accel_sqe {
    // A chain is two steps with a mid buffer of at least one byte (`JobRequest.midCapacity`
    // guarantees it); a descriptor the device finds malformed fails only its own job.
    let step = steps[i]
    var sqe = accel_sqe()
    sqe.cookie = lease.cookie
    sqe.opcode = step.opcode.rawValue
    sqe.algorithm = step.algorithm.rawValue
    sqe.level = step.level
    let first = i == 0
    let last = i == steps.count - 1
    sqe.src_offset = first ? lease.srcOffset + UInt64(lease.srcSkip) : lease.midOffset
    sqe.src_length = first ? lease.srcLength - lease.srcSkip : lease.midCapacity
    sqe.dst_offset = last ? lease.dstOffset : lease.midOffset
    sqe.dst_capacity = last ? lease.dstCapacity : lease.midCapacity
    sqe.src_region = first ? lease.srcRegion : 0
    sqe.dst_region = last ? lease.dstRegion : 0
    if !last { sqe.flags = UInt8(ACCEL_SQE_F_CHAIN) }
    if step.verify && step.opcode == .compress { sqe.flags |= UInt8(ACCEL_SQE_F_VERIFY) }
    if step.streamSlot != 0 {
      sqe.stream_ctx = step.streamSlot
      sqe.flags |= UInt8(ACCEL_SQE_F_STREAM)
      if step.streamStart { sqe.flags |= UInt8(ACCEL_SQE_F_STREAM_START) }
      if step.streamFinal { sqe.flags |= UInt8(ACCEL_SQE_F_STREAM_FINAL) }
    }
    if step.isCrypto {
      sqe.key_slot = lease.keySlot
      if step.opcode != .digest {
        sqe.aux_offset = lease.auxOffset
        sqe.aux_length = lease.auxLength
      }
    }
    return sqe
  }

  /// Drains the completion ring, validating each entry and calling its handler.
  /// Invalid entries (unknown cookie, stale generation, duplicate, sizes beyond
  /// the job's buffers) are dropped and counted; they never reach a caller.
  /// - Returns: the number of entries consumed.
  @discardableResult
  package func reap(limit: Int = .max) -> Int {
    var delivered: [(CompletionHandler, Completion)] = []
    let consumed = reapLock.withLock { head -> Int in
      let tail = cqTail.loadAcquire()
      guard region.cqIndex.isConsistent(head: head, tail: tail) else {
        // The producer index is impossible: the ring cannot be trusted any more.
        // Fail every job on the queue (queue-class, so callers see UNAVAILABLE)
        // and take the queue out of service.
        if !faulted.exchange(true, ordering: .relaxed) {
          counters.invalidCompletions.add(1, ordering: .relaxed)
          delivered = state.withLock { s in
            s.service = .dead(reason: "completion ring indices are corrupt")
            outOfService.store(true, ordering: .relaxed)
            return failAllInFlightLocked(&s, "queue \(queueID): completion ring corrupt")
          }
        }
        return 0
      }
      var n = 0
      var batch: [accel_cqe] = []
      while head != tail && n < limit {
        batch.append(region.cqe(at: head).pointee)
        head &+= 1
        n += 1
      }
      cqHead.storeRelease(head)
      // One pass under the slot lock for the whole batch, not a lock per entry.
      state.withLock { s in
        for cqe in batch {
          if let d = validate(cqe, &s) { delivered.append(d) } else { counters.invalidCompletions.add(1, ordering: .relaxed) }
        }
      }
      return n
    }
    for (handler, completion) in delivered { handler(completion) }
    counters.completed.add(UInt64(delivered.count), ordering: .relaxed)
    return consumed
  }

  /// Checks a completion against the job it names. An entry with an unknown cookie
  /// is dropped; an entry that names a live job but is itself malformed (unknown
  /// status, sizes beyond the job's buffers) fails that job with a queue-class
  /// `deviceFault` instead of leaving it waiting, and is counted as invalid.
  private func validate(_ cqe: accel_cqe, _ s: inout State) -> (CompletionHandler, Completion)? {
    let slot = Int(cqe.cookie & 0xFFFF_FFFF)
    let generation = UInt32(truncatingIfNeeded: cqe.cookie >> 32)
    do {
      guard slot < s.slots.count, case .inFlight(let gen, let lease, let handler, _) = s.slots[slot], gen == generation
      else { return nil }
      s.slots[slot] = .completed(generation: gen)
      guard let status = DeviceStatus(rawValue: cqe.status), cqe.produced <= lease.dstCapacity,
        cqe.consumed <= max(lease.srcLength, lease.midCapacity)
      else {
        // A malformed completion for a live job: the queue is suspect. Take it
        // out of service until a reset, and fail the job as a queue error.
        counters.invalidCompletions.add(1, ordering: .relaxed)
        let why = "queue \(queueID): malformed completion (status \(cqe.status), \(cqe.produced) bytes produced)"
        takeOutOfServiceLocked(&s, why)
        return (handler, .failed(.deviceFault, why, engine: cqe.engine_id))
      }
      return (
        handler,
        Completion(
          status: status, produced: status == .ok || status == .moreOutput ? cqe.produced : 0, consumed: cqe.consumed,
          engineID: cqe.engine_id, engineNanoseconds: cqe.engine_ns)
      )
    }
  }

  package var hasCompletions: Bool { !faulted.load(ordering: .relaxed) && cqTail.loadAcquire() != reapLock.withLock { $0 } }

  /// Takes the queue out of service for good and fails its in-flight jobs with
  /// `deviceFault` (the device behind it is gone). Handlers run on the calling thread.
  package func fault(reason: String = "device gone") {
    faulted.store(true, ordering: .relaxed)
    let failed = state.withLock { s in
      s.service = .dead(reason: reason)
      outOfService.store(true, ordering: .relaxed)
      return failAllInFlightLocked(&s, reason)
    }
    for (handler, completion) in failed { handler(completion) }
    unpark()  // the device behind the queue is gone
  }

  private func takeOutOfServiceLocked(_ s: inout State, _ reason: String) {
    guard case .inService = s.service else { return }
    s.service = .draining(reason: reason)
    outOfService.store(true, ordering: .relaxed)
  }

  /// Completes every in-flight job with `deviceFault`. Their owners release the
  /// buffers; the queue is out of service until the device acknowledges a reset
  /// (which it does only once no engine holds a job of it), so a late write by
  /// the device never lands in another job's buffer.
  ///
  /// `deviceMayStillRun` (a timeout: an engine may be stalled on the job, not
  /// gone) abandons the jobs instead: their buffers are parked on release until
  /// the reset is acknowledged, so neither a pool buffer nor a client's region
  /// is handed back while the device could still write to it.
  private func failAllInFlightLocked(_ s: inout State, _ detail: String, deviceMayStillRun: Bool = false)
    -> [(CompletionHandler, Completion)]
  {
    var out: [(CompletionHandler, Completion)] = []
    for i in s.slots.indices {
      if case .inFlight(let gen, _, let handler, _) = s.slots[i] {
        s.slots[i] = deviceMayStillRun ? .abandoned(generation: gen) : .completed(generation: gen)
        out.append((handler, .failed(.deviceFault, detail)))
      }
    }
    return out
  }

  /// Error recovery, run by the reaper every few tens of milliseconds:
  /// - a queue the device put in error leaves service and drains;
  /// - a job without a completion for `completionTimeout` (lost completion,
  ///   stalled engine) fails with the rest of the queue's in-flight jobs;
  /// - a drained queue asks the device for a reset, and returns to service
  ///   when the device acknowledges it.
  /// - Returns: completions to deliver, and whether the queue changed state.
  package func maintain(now: UInt64, completionTimeout: UInt64) -> (failed: [(CompletionHandler, Completion)], changed: Bool) {
    coarseNow.store(now, ordering: .relaxed)
    guard !faulted.load(ordering: .relaxed) else { return ([], false) }
    let flags = stateFlags.loadAcquire()
    var ring = false
    var unparkAfterLock = false
    let result = state.withLock { s -> ([(CompletionHandler, Completion)], Bool) in
      var failed: [(CompletionHandler, Completion)] = []
      var changed = false
      if case .inService = s.service, flags & ACCEL_QF_ERROR != 0 {
        let status = DeviceStatus(rawValue: UInt16(truncatingIfNeeded: errorStatus.loadAcquire()))
        takeOutOfServiceLocked(&s, "queue \(queueID) in error (\(status.map { "\($0)" } ?? "unknown status"))")
        changed = true
      }
      switch s.service {
      case .inService, .draining:
        var oldest = UInt64.max
        for slot in s.slots { if case .inFlight(_, _, _, let since) = slot { oldest = min(oldest, since) } }
        if oldest != .max && now > oldest && now - oldest > completionTimeout {
          let why =
            "queue \(queueID): no completion within \(completionTimeout / 1_000_000) ms (lost completion or stalled engine)"
          counters.stalls.add(1, ordering: .relaxed)
          takeOutOfServiceLocked(&s, why)
          failed = failAllInFlightLocked(&s, why, deviceMayStillRun: true)
          changed = true
        }
        guard case .draining(let reason) = s.service else { break }
        let busy = s.slots.contains { if case .inFlight = $0 { true } else { false } }
        guard !busy else { break }
        guard region.header.pointee.abi_version & 0xFFFF >= 2 else {
          s.service = .dead(reason: reason + "; the device is too old to reset queues")
          faulted.store(true, ordering: .relaxed)
          changed = true
          break
        }
        let request = resetRequest.fetchAdd(1) &+ 1
        s.service = .awaitingReset(request: request, reason: reason, since: now)
        counters.resets.add(1, ordering: .relaxed)
        ring = true
        changed = true
      case .awaitingReset(let request, let reason, let since):
        if resetAck.loadAcquire() == request {
          unparkAfterLock = true
          s.service = .inService
          outOfService.store(false, ordering: .relaxed)
          resetOverdue.store(false, ordering: .relaxed)
          changed = true
        } else if now > since && now - since > completionTimeout && !resetOverdue.load(ordering: .relaxed) {
          s.service = .awaitingReset(
            request: request, reason: reason + "; the device has not reset the queue (engine hung?)", since: since)
          resetOverdue.store(true, ordering: .relaxed)
          changed = true
        }
      case .dead:
        break
      }
      return (failed, changed)
    }
    if unparkAfterLock { unpark() }
    if ring {
      // Wake a parked engine so it sees the request.
      SharedMemory.fence()
      sqDoorbell.fetchAdd(1)
      sqDoorbell.wake()
    }
    return result
  }

  package var statistics: DriverQueueStatistics {
    DriverQueueStatistics(
      submitted: counters.submitted.load(ordering: .relaxed),
      completed: counters.completed.load(ordering: .relaxed),
      batches: counters.batches.load(ordering: .relaxed),
      doorbellWakes: counters.wakes.load(ordering: .relaxed),
      invalidCompletions: counters.invalidCompletions.load(ordering: .relaxed),
      stalls: counters.stalls.load(ordering: .relaxed), resets: counters.resets.load(ordering: .relaxed))
  }
}

package struct DriverQueueStatistics: Sendable {
  package var submitted: UInt64
  package var completed: UInt64
  package var batches: UInt64
  package var doorbellWakes: UInt64
  package var invalidCompletions: UInt64
  /// Times jobs went without a completion past the timeout.
  package var stalls: UInt64
  /// Resets this driver asked the device for.
  package var resets: UInt64
}

private final class Counters: Sendable {
  let submitted = Atomic<UInt64>(0)
  let descriptors = Atomic<UInt64>(0)
  let completed = Atomic<UInt64>(0)
  let batches = Atomic<UInt64>(0)
  let wakes = Atomic<UInt64>(0)
  let invalidCompletions = Atomic<UInt64>(0)
  let stalls = Atomic<UInt64>(0)
  let resets = Atomic<UInt64>(0)
}

/// A payload written into a queue's data pool before its job exists: the
/// network lane decodes a request's `bytes` field straight into it (see
/// docs/NETWORK_LANE.md), and the job's lease later takes the buffer over as its
/// input, so the dispatcher does not copy the payload again.
///
/// Exactly one of three things ends the staged state, once: a lease adopts the
/// buffer (`DriverQueue.reserve(stagedInput:)`; the lease frees it), the job
/// runs elsewhere and the payload is copied out first (`beginRelocation`,
/// `endRelocation`), or the buffer is freed here (`release`, or when the last
/// reference goes). Each way `onSettle` runs once, when the buffer goes back to
/// the pool. The object keeps its queue, and so the queue's mapping, alive.
package final class StagedInput: Sendable {
  package let queue: DriverQueue
  /// Region offset of the buffer in the queue's pool.
  package let offset: UInt64
  package let length: Int
  /// Zeroed before it is freed (plaintext); a lease that adopts it is made sensitive by its job.
  package let sensitive: Bool
  private enum Phase { case staged, adopted, relocating, released }
  private let phase = Mutex(Phase.staged)
  private let onSettle: @Sendable (Int) -> Void

  fileprivate init(queue: DriverQueue, offset: UInt64, length: Int, sensitive: Bool, onSettle: @escaping @Sendable (Int) -> Void) {
    self.queue = queue
    self.offset = offset
    self.length = length
    self.sensitive = sensitive
    self.onSettle = onSettle
  }

  deinit { release() }

  /// The staged bytes, to be filled by the gRPC layer. Valid while staged, and
  /// after adoption until the lease is released.
  package var buffer: UnsafeMutableRawBufferPointer {
    UnsafeMutableRawBufferPointer(start: queue.region.bytes(at: offset), count: length)
  }

  /// True until a lease adopts the buffer or it is released.
  package var isStaged: Bool { phase.withLock { $0 == .staged } }

  /// Frees the buffer unless a lease has taken it. Idempotent.
  package func release() {
    let free = phase.withLock { p -> Bool in
      guard p == .staged else { return false }
      p = .released
      return true
    }
    guard free else { return }
    queue.releaseStaged(offset: offset, length: length, sensitive: sensitive)
    onSettle(length)
  }

  /// The job runs on another queue: its payload is about to be copied out of
  /// this buffer. From now on only `endRelocation` frees it (`release` does
  /// nothing), so the copy never reads a freed buffer. False if not staged.
  package func beginRelocation() -> Bool {
    phase.withLock { p in
      guard p == .staged else { return false }
      p = .relocating
      return true
    }
  }

  /// The payload was copied out: frees the buffer.
  package func endRelocation() {
    let free = phase.withLock { p -> Bool in
      guard p == .relocating else { return false }
      p = .released
      return true
    }
    guard free else { return }
    queue.releaseStaged(offset: offset, length: length, sensitive: sensitive)
    onSettle(length)
  }

  /// Under the queue's lock (from `reserve`): hands the buffer to a lease.
  fileprivate func adopt() -> Bool {
    phase.withLock { p in
      guard p == .staged else { return false }
      p = .adopted
      return true
    }
  }

  /// When the lease that adopted the buffer is released, outside the queue's lock.
  fileprivate func settle() {
    let adopted = phase.withLock { p -> Bool in
      guard p == .adopted else { return false }
      p = .released
      return true
    }
    if adopted { onSettle(length) }
  }
}
