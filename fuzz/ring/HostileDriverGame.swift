import AccelABI
import AccelDevice
import CAccelABI
import Foundation
import Synchronization

/// A hostile driver against the device, through the real shared memory.
///
/// One device, one engine, two queues. The hostile peer owns queue 0: it writes
/// random descriptors (every opcode, algorithm and flag, offsets at and past the
/// pool's edges, chains, AEAD parameter blocks at the end of the pool), plays index
/// games with `sq_tail`, reaps sometimes and sometimes forges `cq_head`, and asks for
/// resets. A flipper thread rewrites shared words while jobs run: `aad_length`,
/// `tag_length`, key-slot lengths and bytes, `cq_head`. The honest peer owns queue 1
/// and submits a CRC-32C every few milliseconds.
///
/// Oracles: the process survives (a read outside the mappings is a crash); every
/// honest job completes OK, with the right checksum, within `honestBound`; the
/// hostile queue never isolates the device; the device stops within `stopBound`.
struct HostileDriverGame {
  var seed: UInt64
  var seconds: Double
  var honestBound: Duration = .seconds(5)
  var stopBound: Duration = .seconds(10)

  func run() -> Result<String, RingFuzzFailure> {
    let device: EmulatedDevice
    let hostile: RingPeer
    let honest: RingPeer
    do {
      device = try EmulatedDevice(
        configuration: .defaults {
          $0.queueCount = 2
          $0.engineCount = 1
          $0.sqEntries = 8
          $0.dataPoolBytes = 1 << 20
          $0.keySlots = 8
          $0.idleSpin = .microseconds(20)
          $0.parkTimeout = .milliseconds(5)
          $0.isolationCooldown = nil
        })
      device.start()
      hostile = try RingPeer(fd: device.exportQueue(0))
      honest = try RingPeer(fd: device.exportQueue(1))
    } catch {
      return .failure(RingFuzzFailure(message: "setup: \(error)"))
    }
    let counters = HostileCounters()
    let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))

    let writer = Thread { hostileWriter(hostile, seed: seed, counters: counters) }
    let flipper = Thread { flipWords(hostile, seed: seed ^ 0x5EED, counters: counters) }
    writer.start()
    flipper.start()

    var failure: RingFuzzFailure?
    var honestJobs = 0
    var slowest: Duration = .zero
    let l = honest.region.layout
    let input = (0..<16).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 1) }
    honest.region.bytes(at: l.dataOffset).copyMemory(from: input, byteCount: input.count)
    var expected: UInt32?
    while ContinuousClock.now < deadline && failure == nil {
      let sqe = crcJob(l, cookie: UInt64(honestJobs) + 1)
      let started = ContinuousClock.now
      honest.submit(sqe)
      guard let cqe = honest.next(timeout: honestBound) else {
        failure = RingFuzzFailure(message: "honest job \(honestJobs + 1) not served within \(honestBound) (engine wedged by the hostile queue?)")
        break
      }
      let took = ContinuousClock.now - started
      slowest = max(slowest, took)
      let sum = honest.region.bytes(at: l.dataOffset + 4096).loadUnaligned(as: UInt32.self)
      if cqe.cookie != sqe.cookie || cqe.status != 0 || cqe.produced != 4 || (expected != nil && expected != sum) {
        failure = RingFuzzFailure(message: "honest job \(honestJobs + 1) got cookie \(cqe.cookie) status \(cqe.status) produced \(cqe.produced)")
        break
      }
      expected = sum
      honestJobs += 1
      if device.isIsolated { failure = RingFuzzFailure(message: "the hostile queue isolated the device") }
      usleep(2000)
    }
    counters.stop.store(true, ordering: .releasing)
    writer.joinOrAbandon(within: .seconds(5))
    flipper.joinOrAbandon(within: .seconds(5))
    let stopped = Atomic<Bool>(false)
    let stopper = Thread {
      device.stop()
      stopped.store(true, ordering: .releasing)
    }
    stopper.start()
    let stopDeadline = ContinuousClock.now + stopBound
    while !stopped.load(ordering: .acquiring) && ContinuousClock.now < stopDeadline { usleep(1000) }
    if failure == nil && !stopped.load(ordering: .acquiring) {
      failure = RingFuzzFailure(message: "the device did not stop within \(stopBound): an engine is stuck")
    }
    if let failure { return .failure(failure) }
    let stats = device.errorStatistics
    return .success(
      "hostile descriptors \(counters.submitted.load(ordering: .relaxed)), completions \(counters.completions.load(ordering: .relaxed)), "
        + "resets asked \(counters.resets.load(ordering: .relaxed)), word flips \(counters.flips.load(ordering: .relaxed)), sulks \(counters.sulks.load(ordering: .relaxed)), "
        + "honest jobs \(honestJobs) (slowest \(slowest)), dropped completions \(device.queues[0].droppedCompletionCount), "
        + "queue errors \(stats.queueErrors), isolations \(stats.isolations)")
  }
}

/// What the hostile threads did, for the summary.
final class HostileCounters: Sendable {
  /// Set when the game ends.
  let stop = Atomic<Bool>(false)
  let submitted = Atomic<Int>(0)
  let completions = Atomic<Int>(0)
  let resets = Atomic<Int>(0)
  let flips = Atomic<Int>(0)
  let sulks = Atomic<Int>(0)
  /// Set while the writer sulks, so the flipper leaves the ring indices alone.
  let sulking = Atomic<Bool>(false)
  /// The parameter block offset last used, for the flipper to aim at.
  let lastAux = Atomic<UInt64>(0)
}

/// Writes random descriptors into the hostile queue until told to stop.
private func hostileWriter(_ q: RingPeer, seed: UInt64, counters: HostileCounters) {
  var rng = SeededRandom(seed: seed)
  let l = q.region.layout
  let poolEnd = l.dataOffset + l.dataSize
  let lengths: [UInt32] = [0, 1, 15, 16, 17, 31, 32, 33, 64, 4096, 65536, UInt32(l.dataSize), UInt32.max]
  let algorithms: [UInt8] = [0, 1, 2, 3, 4, 5, 6, 15, 16, 17, 18, 19, 32, 33, 34, 35, 36, 37, 38, 39, 40, 255]
  func offset() -> UInt64 {
    switch Int.random(in: 0..<8, using: &rng) {
    case 0: return UInt64.random(in: 0...UInt64.max, using: &rng)
    case 1: return poolEnd - UInt64(rng.edge([0, 1, 16, 32, 48, 64, 4096], wild: 8192))
    case 2: return UInt64.random(in: 0..<l.dataOffset, using: &rng)  // rings, header, key slots
    default: return l.dataOffset + UInt64.random(in: 0..<l.dataSize, using: &rng)
    }
  }
  // Some plausible data: text, and a real AEAD block near the end of the pool.
  let text = Array(String(repeating: "hostile peers share engines. ", count: 200).utf8)
  q.region.bytes(at: l.dataOffset).copyMemory(from: text, byteCount: text.count)
  var nextSulk = ContinuousClock.now + .seconds(2)
  let sulk = Duration.seconds(6)  // longer than the honest bound
  while !counters.stop.load(ordering: .acquiring) {
    let burst = Int.random(in: 1...8, using: &rng)
    for _ in 0..<burst {
      var s = accel_sqe()
      s.cookie = rng.next()
      s.opcode = rng.edge([0, 1, 2, 3, 4, 5], wild: 255, wildOdds: 12)
      s.algorithm = algorithms.randomElement(using: &rng) ?? 0
      s.level = rng.edge([0, 1, 3, 9, 12, 19], wild: 255)
      s.flags = Int.random(in: 0..<3, using: &rng) == 0 ? UInt8.random(in: 0...31, using: &rng) : 0
      s.key_slot = rng.edge([0, 1, 2, 8], wild: 20)
      s.src_offset = offset()
      s.dst_offset = offset()
      s.src_length = rng.edge(lengths, wild: 1 << 20)
      s.dst_capacity = rng.edge(lengths, wild: 1 << 20)
      if s.opcode == 3 || s.opcode == 4 || Int.random(in: 0..<8, using: &rng) == 0 {
        s.aux_offset = offset()
        s.aux_length = rng.edge([0, 31, 32, 33, 64, 96], wild: 1 << 16)
        if s.aux_offset >= l.dataOffset, s.aux_offset < poolEnd, poolEnd - s.aux_offset >= 32 {
          let block = q.region.bytes(at: s.aux_offset)
          block.storeBytes(of: rng.edge([0, 1, 16, 32, 64], wild: UInt32.max), toByteOffset: 12, as: UInt32.self)
          block.storeBytes(of: rng.edge([16, 0, 12, 17], wild: UInt32.max), toByteOffset: 16, as: UInt32.self)
          counters.lastAux.store(s.aux_offset, ordering: .relaxed)
        }
      }
      if Int.random(in: 0..<4, using: &rng) == 0 { s = wellFormedSeal(q, &rng, counters: counters) }
      if s.flags & UInt8(ACCEL_SQE_F_STREAM) != 0 { s.stream_ctx = rng.edge([0, 1, 2, 64, 65], wild: UInt32.max) }
      s.src_region = Int.random(in: 0..<16, using: &rng) == 0 ? UInt16.random(in: 0...5, using: &rng) : 0
      s.dst_region = Int.random(in: 0..<16, using: &rng) == 0 ? UInt16.random(in: 0...5, using: &rng) : 0
      if Int.random(in: 0..<32, using: &rng) == 0 { s.reserved = 1 }
      q.stage(s)
      counters.submitted.add(1, ordering: .relaxed)
    }
    switch Int.random(in: 0..<64, using: &rng) {
    case 0: q.tail &+= UInt32.random(in: 1...32, using: &rng)  // claims descriptors it never wrote
    case 1: q.tail = UInt32.random(in: 0...UInt32.max, using: &rng)
    default: break
    }
    q.publish()
    switch Int.random(in: 0..<10, using: &rng) {
    case 0: break  // does not reap
    case 1: SharedWord(q.region.field(\.cq_head)).storeRelease(UInt32.random(in: 0...UInt32.max, using: &rng))
    default: counters.completions.add(q.drain(), ordering: .relaxed)
    }
    if ContinuousClock.now > nextSulk {
      // Sulks: the completion ring looks full (a forged cq_head) and nobody reaps for
      // longer than the honest peer's bound. Only this queue may stall.
      counters.sulking.store(true, ordering: .releasing)
      q.requestReset(within: .milliseconds(500))  // from a clean queue, so the engine does post
      counters.completions.add(q.drain(), ordering: .relaxed)
      let cqTail = SharedWord(q.region.field(\.cq_tail)).loadAcquire()
      SharedWord(q.region.field(\.cq_head)).storeRelease(cqTail &- q.region.layout.cqEntries)
      q.head = cqTail &- q.region.layout.cqEntries
      for _ in 0..<Int(q.region.layout.sqEntries) { q.stage(crcJob(l, cookie: rng.next())) }
      q.publish()
      let end = ContinuousClock.now + sulk
      while ContinuousClock.now < end && !counters.stop.load(ordering: .acquiring) { usleep(10_000) }
      counters.sulks.add(1, ordering: .relaxed)
      counters.sulking.store(false, ordering: .releasing)
      nextSulk = ContinuousClock.now + .seconds(Int64.random(in: 3...8, using: &rng))
      q.requestReset(within: .milliseconds(500))
      counters.completions.add(q.drain(), ordering: .relaxed)
    }
    if Int.random(in: 0..<40, using: &rng) == 0 {
      counters.resets.add(1, ordering: .relaxed)
      q.requestReset(within: .milliseconds(500))
      counters.completions.add(q.drain(), ordering: .relaxed)
    }
    usleep(UInt32.random(in: 0...300, using: &rng))
  }
}

/// An AES-128-GCM seal that passes every check: a 16-byte key in slot 1 and a
/// parameter block with 16 bytes of AAD near the end of the pool. It is the job the
/// flipper races: `aad_length` changing after the device checked it.
private func wellFormedSeal(_ q: RingPeer, _ rng: inout SeededRandom, counters: HostileCounters) -> accel_sqe {
  let l = q.region.layout
  if let slot = l.keySlot(1) {
    let key = q.region.bytes(at: slot)
    key.storeBytes(of: UInt32(16), as: UInt32.self)
    key.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
  }
  let aux = l.dataOffset + l.dataSize - 64
  let block = q.region.bytes(at: aux)
  block.storeBytes(of: UInt32(16), toByteOffset: 12, as: UInt32.self)  // aad_length
  block.storeBytes(of: UInt32(16), toByteOffset: 16, as: UInt32.self)  // tag_length
  for word in 0..<3 { block.storeBytes(of: UInt32(0), toByteOffset: 20 + 4 * word, as: UInt32.self) }
  counters.lastAux.store(aux, ordering: .relaxed)
  var s = accel_sqe()
  s.cookie = rng.next()
  s.opcode = UInt8(ACCEL_OP_ENCRYPT.rawValue)
  s.algorithm = UInt8(ACCEL_ALG_AES128_GCM.rawValue)
  s.key_slot = 1
  s.src_offset = l.dataOffset
  s.src_length = UInt32.random(in: 0...4096, using: &rng)
  s.dst_offset = l.dataOffset + (l.dataSize / 2)
  s.dst_capacity = s.src_length + 16
  s.aux_offset = aux
  s.aux_length = 48
  return s
}

/// Rewrites shared words of the hostile queue while the engine works on them.
private func flipWords(_ q: RingPeer, seed: UInt64, counters: HostileCounters) {
  var rng = SeededRandom(seed: seed)
  let l = q.region.layout
  while !counters.stop.load(ordering: .acquiring) {
    let aux = counters.lastAux.load(ordering: .relaxed)
    switch Int.random(in: 0..<6, using: &rng) {
    case 0, 1:
      if aux != 0 {  // aad_length: small, then huge, as fast as possible
        let word = SharedWord(q.region.bytes(at: aux + 12).assumingMemoryBound(to: UInt32.self))
        for _ in 0..<64 { word.storeRelease(0); word.storeRelease(UInt32.random(in: 0...UInt32.max, using: &rng)) }
      }
    case 2:
      if aux != 0 {
        SharedWord(q.region.bytes(at: aux + 16).assumingMemoryBound(to: UInt32.self))
          .storeRelease(rng.edge([16, 0, 15, 17], wild: UInt32.max))
      }
    case 3:
      if let slot = l.keySlot(UInt32.random(in: 1...l.keySlotCount, using: &rng)) {
        let key = q.region.bytes(at: slot)
        key.storeBytes(of: rng.edge([0, 16, 32, 64, 128, 129], wild: UInt32.max), as: UInt32.self)
        key.storeBytes(of: UInt8.random(in: 0...255, using: &rng), toByteOffset: 8 + Int.random(in: 0..<128, using: &rng), as: UInt8.self)
      }
    case 4 where !counters.sulking.load(ordering: .acquiring):
      SharedWord(q.region.field(\.cq_head)).storeRelease(UInt32.random(in: 0...UInt32.max, using: &rng))
    case 5 where !counters.sulking.load(ordering: .acquiring):
      SharedWord(q.region.field(\.sq_tail)).storeRelease(UInt32.random(in: 0...UInt32.max, using: &rng))
    default: break
    }
    counters.flips.add(1, ordering: .relaxed)
    if Int.random(in: 0..<4, using: &rng) == 0 { usleep(50) }
  }
}

/// A CRC-32C of the first 16 bytes of the pool into the next page: a small valid job.
func crcJob(_ l: RegionLayout, cookie: UInt64) -> accel_sqe {
  var sqe = accel_sqe()
  sqe.cookie = cookie
  sqe.opcode = UInt8(ACCEL_OP_DIGEST.rawValue)
  sqe.algorithm = UInt8(ACCEL_ALG_CRC32C.rawValue)
  sqe.src_offset = l.dataOffset
  sqe.src_length = 16
  sqe.dst_offset = l.dataOffset + 4096
  sqe.dst_capacity = 4
  return sqe
}
