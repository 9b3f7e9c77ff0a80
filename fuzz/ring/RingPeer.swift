import AccelABI
import CAccelABI
import Foundation

/// One peer's end of a queue region, written raw (no driver): descriptors in, completions out.
final class RingPeer: @unchecked Sendable {
  let region: QueueRegion
  /// The peer's producer index (what it publishes as `sq_tail`).
  var tail: UInt32 = 0
  /// The peer's consumer index (what it publishes as `cq_head`).
  var head: UInt32 = 0

  init(fd: Int32) throws { region = try QueueRegion.attach(fd: fd) }

  /// Writes a descriptor at the tail without publishing it.
  func stage(_ sqe: accel_sqe) {
    region.sqe(at: tail).pointee = sqe
    tail &+= 1
  }

  /// Publishes the tail and rings the doorbell if the device sleeps.
  func publish() {
    SharedWord(region.field(\.sq_tail)).storeRelease(tail)
    SharedMemory.fence()
    if SharedWord(region.field(\.sq_need_wakeup)).loadAcquire() != 0 {
      SharedWord(region.field(\.sq_doorbell)).fetchAdd(1)
      SharedWord(region.field(\.sq_doorbell)).wake()
    }
  }

  func submit(_ sqe: accel_sqe) {
    stage(sqe)
    publish()
  }

  /// Waits for the next completion, polling.
  func next(timeout: Duration) -> accel_cqe? {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
      if SharedWord(region.field(\.cq_tail)).loadAcquire() != head {
        let c = region.cqe(at: head).pointee
        head &+= 1
        SharedWord(region.field(\.cq_head)).storeRelease(head)
        return c
      }
      usleep(50)
    }
    return nil
  }

  /// Takes every completion posted so far; returns how many.
  func drain() -> Int {
    let tail = SharedWord(region.field(\.cq_tail)).loadAcquire()
    let n = Int(tail &- head)
    head = tail
    SharedWord(region.field(\.cq_head)).storeRelease(head)
    return n
  }

  /// Asks the device for a reset and waits for its acknowledgement (or gives up).
  func requestReset(within limit: Duration) {
    let request = SharedWord(region.field(\.reset_request))
    let ack = SharedWord(region.field(\.reset_ack))
    request.fetchAdd(1)
    SharedWord(region.field(\.sq_doorbell)).fetchAdd(1)
    SharedWord(region.field(\.sq_doorbell)).wake()
    let deadline = ContinuousClock.now + limit
    while ack.loadAcquire() != request.loadAcquire() && ContinuousClock.now < deadline {
      _ = drain()
      usleep(200)
    }
    tail = SharedWord(region.field(\.sq_tail)).loadAcquire()
  }
}

extension Thread {
  /// Waits for the thread to finish, up to `limit` (a stuck thread is left behind).
  func joinOrAbandon(within limit: Duration) {
    let deadline = ContinuousClock.now + limit
    while !isFinished && ContinuousClock.now < deadline { usleep(1000) }
  }
}
