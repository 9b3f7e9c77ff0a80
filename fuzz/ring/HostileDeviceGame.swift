import AccelABI
import AccelDriver
import CAccelABI
import Foundation
import Synchronization

/// A hostile device against the driver, through the real shared memory.
///
/// The game plays the device side of a queue region by hand, on a fake clock. The
/// driver reserves and submits jobs; the "device" reads the SQ and answers with a
/// mix of genuine completions and forged ones: unknown cookies, stale generations,
/// out-of-range slots, produced > capacity, unknown statuses, duplicates, late
/// answers after the driver gave up, `cq_tail` jumps and rewinds, the error flag,
/// and resets acknowledged or not. A queue the driver declares dead is replaced.
///
/// Oracles: no crash; a job completes at most once; it completes OK only from a
/// genuine completion that names it exactly; and no job stays in flight longer than
/// the completion timeout plus one step of the fake clock.
struct HostileDeviceGame {
  var seed: UInt64
  var seconds: Double
  let completionTimeout: UInt64 = 1_000_000_000
  let maxStep: UInt64 = 200_000_000

  /// One submitted job, as the game tracks it.
  struct Job {
    var lease: Lease
    var submittedAt: UInt64
    var genuinePosted = false
  }

  func run() -> Result<String, RingFuzzFailure> {
    var rng = SeededRandom(seed: seed)
    let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
    var now: UInt64 = 1_000_000_000
    var totals = (jobs: 0, ok: 0, failed: 0, queues: 0, forged: 0)
    while ContinuousClock.now < deadline {
      totals.queues += 1
      let outcome = playOneQueue(&rng, now: &now, until: deadline, totals: &totals)
      if case .failure(let f) = outcome { return .failure(f) }
    }
    return .success(
      "queues \(totals.queues), jobs \(totals.jobs), completed ok \(totals.ok), failed \(totals.failed), forged or malformed completions \(totals.forged)")
  }

  private func playOneQueue(
    _ rng: inout SeededRandom, now: inout UInt64, until deadline: ContinuousClock.Instant,
    totals: inout (jobs: Int, ok: Int, failed: Int, queues: Int, forged: Int)
  ) -> Result<Void, RingFuzzFailure> {
    let layout: RegionLayout
    let device: QueueRegion
    let driver: DriverQueue
    do {
      layout = try RegionLayout(sqEntries: 16, cqEntries: 16, dataPoolBytes: 1 << 20)
      device = try QueueRegion.create(layout: layout, queueID: 0, weight: 1, name: "hostile-device")
      driver = DriverQueue(index: 0, region: try QueueRegion.attach(fd: dup(device.fd)))
    } catch {
      return .failure(RingFuzzFailure(message: "setup: \(error)"))
    }
    let delivered = Mutex<[(UInt64, Completion)]>([])
    var jobs: [UInt64: Job] = [:]  // by cookie
    var finished: Set<UInt64> = []
    var sqHead: UInt32 = 0
    var cqTail: UInt32 = 0
    var heldBack: [accel_cqe] = []
    var posted: [accel_cqe] = []
    let flags = SharedWord(device.field(\.state_flags))

    func post(_ c: accel_cqe) {
      device.cqe(at: cqTail).pointee = c
      cqTail &+= 1
      SharedWord(device.field(\.cq_tail)).storeRelease(cqTail)
    }

    // The driver stamps jobs with its own idea of now until it is first told the time.
    _ = driver.maintain(now: now, completionTimeout: completionTimeout)
    for _ in 0..<400 where ContinuousClock.now < deadline {
      // The driver: a few new jobs while it has room and is in service.
      if driver.isHealthy {
        var batch: [(lease: Lease, steps: [DeviceStep])] = []
        for _ in 0..<Int.random(in: 0...4, using: &rng) {
          let src = UInt32.random(in: 1...4096, using: &rng)
          let dst = UInt32.random(in: 1...8192, using: &rng)
          let cookieBox = Mutex<UInt64>(0)
          guard
            let lease = driver.reserve(srcLength: src, dstCapacity: dst, handler: { c in
              let cookie = cookieBox.withLock { $0 }
              delivered.withLock { $0.append((cookie, c)) }
            })
          else { break }
          cookieBox.withLock { $0 = lease.cookie }
          batch.append((lease, [DeviceStep(.compress, .gzip, level: 1)]))
          jobs[lease.cookie] = Job(lease: lease, submittedAt: now)
        }
        if !batch.isEmpty {
          // `submit` always publishes; its result only says whether it rang the doorbell.
          driver.submit(batch)
          totals.jobs += batch.count
        }
      }

      // The device: read what was submitted, then answer badly or well.
      let sqTail = SharedWord(device.field(\.sq_tail)).loadAcquire()
      var fresh: [accel_sqe] = []
      while sqHead != sqTail && fresh.count < Int(layout.sqEntries) {
        fresh.append(device.sqe(at: sqHead).pointee)
        sqHead &+= 1
      }
      SharedWord(device.field(\.sq_head)).storeRelease(sqHead)
      for sqe in fresh {
        var c = accel_cqe()
        c.cookie = sqe.cookie
        c.produced = min(sqe.dst_capacity, UInt32.random(in: 0...64, using: &rng))
        c.consumed = sqe.src_length
        switch Int.random(in: 0..<12, using: &rng) {
        case 0: heldBack.append(c)  // late: posted after the driver may have given up
        case 1: c.cookie = rng.next(); totals.forged += 1; post(c)
        case 2: c.cookie = sqe.cookie ^ (1 << 40); totals.forged += 1; post(c)
        case 3: c.cookie = sqe.cookie | 0xFFFF; totals.forged += 1; post(c)
        case 4: c.produced = sqe.dst_capacity &+ 1; totals.forged += 1; post(c)
        case 5: c.status = UInt16.random(in: 15...UInt16.max, using: &rng); totals.forged += 1; post(c)
        case 6: break  // lost
        default:
          jobs[sqe.cookie]?.genuinePosted = true
          post(c)
          posted.append(c)
        }
      }
      switch Int.random(in: 0..<40, using: &rng) {
      case 0: if let again = posted.randomElement(using: &rng) { post(again) }  // duplicate
      case 1: while let late = heldBack.popLast() { jobs[late.cookie]?.genuinePosted = true; post(late) }
      case 2: SharedWord(device.field(\.cq_tail)).storeRelease(cqTail &+ UInt32.random(in: 17...UInt32.max, using: &rng))
      case 3: SharedWord(device.field(\.cq_tail)).storeRelease(cqTail &- UInt32.random(in: 1...4, using: &rng))
      case 4: flags.fetchOr(ACCEL_QF_ERROR)
      default: SharedWord(device.field(\.cq_tail)).storeRelease(cqTail)
      }
      // Acknowledge a reset most of the time, as a device would.
      let request = SharedWord(device.field(\.reset_request)).loadAcquire()
      if request != SharedWord(device.field(\.reset_ack)).loadAcquire(), Int.random(in: 0..<3, using: &rng) != 0 {
        sqHead = SharedWord(device.field(\.sq_tail)).loadAcquire()
        SharedWord(device.field(\.sq_head)).storeRelease(sqHead)
        flags.fetchAnd(~ACCEL_QF_ERROR)
        SharedWord(device.field(\.reset_ack)).storeRelease(request)
      }

      // The driver reaps and keeps time.
      _ = driver.reap()
      now += UInt64.random(in: 0...maxStep, using: &rng)
      for (handler, completion) in driver.maintain(now: now, completionTimeout: completionTimeout).failed {
        handler(completion)
      }

      // Oracles.
      for (cookie, completion) in delivered.withLock({ d in defer { d.removeAll() }; return d }) {
        guard let job = jobs.removeValue(forKey: cookie) else {
          let again = finished.contains(cookie) ? "twice" : "without being submitted"
          return .failure(RingFuzzFailure(message: "job \(String(cookie, radix: 16)) completed \(again) (\(completion.status))"))
        }
        finished.insert(cookie)
        if completion.status == .ok {
          guard job.genuinePosted else {
            return .failure(RingFuzzFailure(message: "job \(String(cookie, radix: 16)) completed OK from a forged completion"))
          }
          guard completion.produced <= job.lease.dstCapacity else {
            return .failure(RingFuzzFailure(message: "job \(String(cookie, radix: 16)) was told it produced more than its buffer"))
          }
          totals.ok += 1
        } else {
          totals.failed += 1
        }
        driver.release(job.lease)
      }
      if let stuck = jobs.values.first(where: { now - $0.submittedAt > completionTimeout + 2 * maxStep }) {
        return .failure(
          RingFuzzFailure(
            message: "job \(String(stuck.lease.cookie, radix: 16)) in flight \((now - stuck.submittedAt) / 1_000_000) ms, past its \(completionTimeout / 1_000_000) ms deadline (driver state: \(driver.service))"))
      }
      if case .dead = driver.service, jobs.isEmpty { break }
    }
    return .success(())
  }
}
