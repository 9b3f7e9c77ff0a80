package import AccelABI
internal import CAccelABI
internal import Synchronization

/// Resources one job holds on a queue between reservation and release:
/// a completion slot and its buffers in the data pool.
package struct Lease: Sendable {
  package let queueIndex: Int
  package let slot: Int
  package let cookie: UInt64
  package let srcOffset: UInt64
  package let srcLength: UInt32
  package let dstOffset: UInt64
  package let dstCapacity: UInt32
}

/// A completion as the driver delivers it, after validation.
package struct Completion: Sendable {
  package var status: DeviceStatus
  package var produced: UInt32
  package var consumed: UInt32
  package var engineID: UInt16
  package var engineNanoseconds: UInt64
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

  private enum SlotState {
    case free
    case inFlight(generation: UInt32, lease: Lease, handler: CompletionHandler)
    /// Completed and delivered; the owner still holds the buffers.
    case completed(generation: UInt32)
  }

  private struct State {
    var pool: PoolAllocator
    var slots: [SlotState]
    var freeSlots: [Int]
    var generation: UInt32 = 0
    /// Driver's private copy of sq_tail.
    var tail: UInt32 = 0
    var leased = 0
  }

  private let state: Mutex<State>
  /// Serialises reaping; only the reaper thread takes it, except in tests.
  private let reapLock = Mutex<UInt32>(0)  // private copy of cq_head
  private let counters = Counters()
  /// Set when the completion ring itself is corrupt; the queue takes no more work.
  private let faulted = Atomic<Bool>(false)

  package init(index: Int, region: QueueRegion) {
    self.index = index
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
    let layout = region.layout
    let slots = Int(layout.sqEntries)
    let startTail = SharedWord(region.field(\.sq_tail)).loadAcquire()
    let startHead = SharedWord(region.field(\.cq_head)).loadAcquire()
    state = Mutex(
      State(
        pool: PoolAllocator(base: layout.dataOffset, capacity: layout.dataSize, alignment: UInt64(ACCEL_BUFFER_ALIGN)),
        slots: Array(repeating: .free, count: slots),
        freeSlots: Array((0..<slots).reversed()),
        tail: startTail))
    reapLock.withLock { $0 = startHead }
  }

  package var queueID: UInt32 { region.queueID }
  package var poolCapacity: UInt64 { region.layout.dataSize }
  package var slotCount: Int { Int(region.layout.sqEntries) }
  package var isHealthy: Bool {
    !faulted.load(ordering: .relaxed)
      && stateFlags.loadAcquire() & (ACCEL_QF_ERROR | ACCEL_QF_STOPPED | ACCEL_QF_ISOLATED) == 0
  }

  /// Jobs holding a slot (in flight or awaiting release).
  package var leasedCount: Int { state.withLock { $0.leased } }
  package var poolFreeBytes: UInt64 { state.withLock { $0.pool.freeBytes } }

  /// The bytes a pool allocation of `size` really takes.
  package func poolFootprint(_ size: UInt64) -> UInt64 { state.withLock { $0.pool.rounded(size) } }

  /// Reserves a slot and buffers for one job, or nil if the queue has no room.
  package func reserve(srcLength: UInt32, dstCapacity: UInt32, handler: @escaping CompletionHandler) -> Lease? {
    state.withLock { s -> Lease? in
      guard let slot = s.freeSlots.last else { return nil }
      guard let src = s.pool.allocate(UInt64(srcLength)) else { return nil }
      guard let dst = s.pool.allocate(UInt64(dstCapacity)) else {
        s.pool.release(offset: src, size: UInt64(srcLength))
        return nil
      }
      s.freeSlots.removeLast()
      s.generation &+= 1
      let gen = s.generation
      let lease = Lease(
        queueIndex: index, slot: slot, cookie: UInt64(gen) << 32 | UInt64(slot),
        srcOffset: src, srcLength: srcLength, dstOffset: dst, dstCapacity: dstCapacity)
      s.slots[slot] = .inFlight(generation: gen, lease: lease, handler: handler)
      s.leased += 1
      return lease
    }
  }

  /// Frees a lease's buffers and slot. Safe only once the device has completed
  /// the job (or will never touch the buffers again).
  package func release(_ lease: Lease) {
    state.withLock { s in
      s.pool.release(offset: lease.srcOffset, size: UInt64(lease.srcLength))
      s.pool.release(offset: lease.dstOffset, size: UInt64(lease.dstCapacity))
      s.slots[lease.slot] = .free
      s.freeSlots.append(lease.slot)
      s.leased -= 1
    }
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
  /// Leases always fit: there are as many slots as SQ entries.
  /// - Returns: true if a wake syscall was made.
  @discardableResult
  package func submit(_ batch: [(lease: Lease, opcode: DeviceOpcode, algorithm: DeviceAlgorithm, level: UInt8)]) -> Bool {
    guard !batch.isEmpty else { return false }
    state.withLock { s in
      var tail = s.tail
      for job in batch {
        var sqe = accel_sqe()
        sqe.cookie = job.lease.cookie
        sqe.opcode = job.opcode.rawValue
        sqe.algorithm = job.algorithm.rawValue
        sqe.level = job.level
        sqe.src_offset = job.lease.srcOffset
        sqe.src_length = job.lease.srcLength
        sqe.dst_offset = job.lease.dstOffset
        sqe.dst_capacity = job.lease.dstCapacity
        region.sqe(at: tail).pointee = sqe
        tail &+= 1
      }
      s.tail = tail
      sqTail.storeRelease(tail)
    }
    counters.submitted.add(UInt64(batch.count), ordering: .relaxed)
    counters.batches.add(1, ordering: .relaxed)
    SharedMemory.fence()
    if sqNeedWakeup.loadAcquire() != 0 {
      sqDoorbell.fetchAdd(1)
      sqDoorbell.wake()
      counters.wakes.add(1, ordering: .relaxed)
      return true
    }
    return false
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
          delivered = failAllInFlight()
        }
        return 0
      }
      var n = 0
      while head != tail && n < limit {
        let cqe = region.cqe(at: head).pointee
        head &+= 1
        n += 1
        if let d = validate(cqe) { delivered.append(d) } else { counters.invalidCompletions.add(1, ordering: .relaxed) }
      }
      cqHead.storeRelease(head)
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
  private func validate(_ cqe: accel_cqe) -> (CompletionHandler, Completion)? {
    let slot = Int(cqe.cookie & 0xFFFF_FFFF)
    let generation = UInt32(truncatingIfNeeded: cqe.cookie >> 32)
    return state.withLock { s -> (CompletionHandler, Completion)? in
      guard slot < s.slots.count, case .inFlight(let gen, let lease, let handler) = s.slots[slot], gen == generation
      else { return nil }
      s.slots[slot] = .completed(generation: gen)
      guard let status = DeviceStatus(rawValue: cqe.status), cqe.produced <= lease.dstCapacity,
        cqe.consumed <= lease.srcLength
      else {
        counters.invalidCompletions.add(1, ordering: .relaxed)
        return (
          handler,
          Completion(status: .deviceFault, produced: 0, consumed: 0, engineID: cqe.engine_id, engineNanoseconds: 0)
        )
      }
      return (
        handler,
        Completion(
          status: status, produced: status == .ok ? cqe.produced : 0, consumed: cqe.consumed,
          engineID: cqe.engine_id, engineNanoseconds: cqe.engine_ns)
      )
    }
  }

  package var hasCompletions: Bool { !faulted.load(ordering: .relaxed) && cqTail.loadAcquire() != reapLock.withLock { $0 } }

  /// Completes every in-flight job with `deviceFault`. Their buffers stay leased
  /// to their owners, who release them; the queue takes no new work, so a late
  /// write by the device can never land in another job's buffer.
  private func failAllInFlight() -> [(CompletionHandler, Completion)] {
    state.withLock { s in
      var out: [(CompletionHandler, Completion)] = []
      for i in s.slots.indices {
        if case .inFlight(let gen, _, let handler) = s.slots[i] {
          s.slots[i] = .completed(generation: gen)
          out.append((handler, Completion(status: .deviceFault, produced: 0, consumed: 0, engineID: 0, engineNanoseconds: 0)))
        }
      }
      return out
    }
  }

  package var statistics: DriverQueueStatistics {
    DriverQueueStatistics(
      submitted: counters.submitted.load(ordering: .relaxed),
      completed: counters.completed.load(ordering: .relaxed),
      batches: counters.batches.load(ordering: .relaxed),
      doorbellWakes: counters.wakes.load(ordering: .relaxed),
      invalidCompletions: counters.invalidCompletions.load(ordering: .relaxed))
  }
}

package struct DriverQueueStatistics: Sendable {
  package var submitted: UInt64
  package var completed: UInt64
  package var batches: UInt64
  package var doorbellWakes: UInt64
  package var invalidCompletions: UInt64
}

private final class Counters: Sendable {
  let submitted = Atomic<UInt64>(0)
  let completed = Atomic<UInt64>(0)
  let batches = Atomic<UInt64>(0)
  let wakes = Atomic<UInt64>(0)
  let invalidCompletions = Atomic<UInt64>(0)
}
