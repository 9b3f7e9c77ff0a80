import AccelABI
import AccelDevice
import CAccelABI
import CAccelSys
import Foundation
import Synchronization
import Testing

/// A hostile driver against the device, through the real shared memory: whatever
/// it writes, and whenever, it may hurt only its own queue (issue 17, findings 2-4).
@Suite(.timeLimit(.minutes(2))) struct HostilePeerTests {
  typealias RawQueue = DeviceRingTests.RawQueue

  static func device(queues: Int = 2, isolationThreshold: Int = 16) throws -> EmulatedDevice {
    let d = try EmulatedDevice(
      configuration: .defaults {
        $0.queueCount = queues
        $0.engineCount = 1
        $0.sqEntries = 8
        $0.dataPoolBytes = 1 << 20
        $0.idleSpin = .microseconds(10)
        $0.parkTimeout = .milliseconds(5)
        $0.isolationThreshold = isolationThreshold
        $0.isolationCooldown = nil
      })
    d.start()
    return d
  }

  /// A CRC-32C of 16 bytes: a small job an honest peer uses to see that it is served.
  static func crc(_ q: RawQueue, cookie: UInt64) -> accel_sqe {
    let l = q.region.layout
    var s = accel_sqe()
    s.cookie = cookie
    s.opcode = UInt8(ACCEL_OP_DIGEST.rawValue)
    s.algorithm = UInt8(ACCEL_ALG_CRC32C.rawValue)
    s.src_offset = l.dataOffset
    s.src_length = 16
    s.dst_offset = l.dataOffset + 4096
    s.dst_capacity = 4
    return s
  }

  static func served(_ q: RawQueue, cookie: UInt64, within: Duration = .seconds(10)) -> Bool {
    q.submit(crc(q, cookie: cookie))
    guard let c = q.next(timeout: within) else { return false }
    return c.cookie == cookie && c.status == 0
  }

  /// Finding 2: `aad_length` is read from the shared parameter block. The device
  /// used to check it in Swift and let the C engine read it again, so a peer that
  /// flipped it after the check made OpenSSL read far past the block (here: past
  /// the end of the mapping, a crash). The block is now copied once, then checked.
  @Test func flippingTheAADLengthDuringJobsNeverReachesTheEngine() throws {
    let dev = try Self.device(queues: 1)
    defer { dev.stop() }
    let q = try RawQueue(dev.exportQueue(0))
    let l = q.region.layout
    // The parameter block sits at the very end of the pool: a long AAD read leaves the mapping.
    let auxOffset = l.dataOffset + l.dataSize - 64
    let params = q.region.bytes(at: auxOffset)
    params.initializeMemory(as: UInt8.self, repeating: 0, count: 64)
    params.storeBytes(of: 32, toByteOffset: 12, as: UInt32.self)  // aad_length
    params.storeBytes(of: 16, toByteOffset: 16, as: UInt32.self)  // tag_length
    let slot = try #require(l.keySlot(1))
    q.region.bytes(at: slot).storeBytes(of: 32, as: UInt32.self)
    q.region.bytes(at: slot + 8).initializeMemory(as: UInt8.self, repeating: 0x42, count: 32)
    var sqe = accel_sqe()
    sqe.opcode = UInt8(ACCEL_OP_ENCRYPT.rawValue)
    sqe.algorithm = UInt8(ACCEL_ALG_AES256_GCM.rawValue)
    sqe.key_slot = 1
    sqe.src_offset = l.dataOffset
    sqe.src_length = 256
    sqe.dst_offset = l.dataOffset + 4096
    sqe.dst_capacity = 4096
    sqe.aux_offset = auxOffset
    sqe.aux_length = 64

    let aadLength = SharedWord((params + 12).assumingMemoryBound(to: UInt32.self))
    let stop = Atomic<Bool>(false)
    let flipperDone = DispatchSemaphore(value: 0)
    let flipper = Thread {
      while !stop.load(ordering: .relaxed) {
        aadLength.storeRelease(32)
        aadLength.storeRelease(0x7FFF_0000)  // passes the engine's own INT32_MAX check
      }
      flipperDone.signal()
    }
    flipper.start()
    // The flipper writes into the queue region: it must be gone before the region is unmapped.
    defer {
      stop.store(true, ordering: .relaxed)
      flipperDone.wait()
    }
    var statuses: [UInt16: Int] = [:]
    for i in 0..<3000 {
      sqe.cookie = UInt64(i) + 1
      q.submit(sqe)
      let c = try #require(q.next(), "job \(i) got no completion")
      statuses[c.status, default: 0] += 1
    }
    let allowed: Set<UInt16> = [UInt16(ACCEL_STATUS_OK.rawValue), UInt16(ACCEL_STATUS_BAD_PARAMS.rawValue)]
    #expect(Set(statuses.keys).isSubset(of: allowed), "statuses: \(statuses)")
    #expect(!dev.isIsolated)
  }

  /// Finding 3: resets are the driver's to ask for, so any peer can ask for many.
  /// They used to count toward device isolation (16 isolated every queue of every
  /// gateway). Now they cost only the asking queue; the device stays in service.
  @Test func aPeerAskingForManyResetsDoesNotIsolateTheDevice() throws {
    let dev = try Self.device(queues: 2, isolationThreshold: 4)
    defer { dev.stop() }
    let hostile = try RawQueue(dev.exportQueue(0))
    let honest = try RawQueue(dev.exportQueue(1))
    let request = SharedWord(hostile.region.field(\.reset_request))
    let ack = SharedWord(hostile.region.field(\.reset_ack))
    for n in 1...12 {
      request.fetchAdd(1)
      SharedWord(hostile.region.field(\.sq_doorbell)).fetchAdd(1)
      SharedWord(hostile.region.field(\.sq_doorbell)).wake()
      let end = ContinuousClock.now + .seconds(10)
      while ack.loadAcquire() != request.loadAcquire() && ContinuousClock.now < end { usleep(200) }
      #expect(ack.loadAcquire() == request.loadAcquire(), "reset \(n) was not carried out")
    }
    #expect(!dev.isIsolated, "a peer's resets isolated the device")
    #expect(dev.errorStatistics.resets == 12)
    #expect(dev.errorStatistics.queueErrors == 0)
    #expect(Self.served(honest, cookie: 77))
    #expect(Self.served(hostile, cookie: 78), "the asking queue itself still works")
  }

  /// Finding 4: posting a completion waited on `cq_head`, which the peer owns. A
  /// peer that wrote an impossible `cq_head` (or never reaped) wedged the engine,
  /// and with it every queue it serves. Now the wait is bounded: the peer's queue
  /// goes into error and the engine moves on.
  @Test func aPeerThatFakesAFullCompletionRingStallsOnlyItsOwnQueue() throws {
    let dev = try Self.device(queues: 2)
    defer { dev.stop() }
    let hostile = try RawQueue(dev.exportQueue(0))
    let honest = try RawQueue(dev.exportQueue(1))
    // cq_head far behind cq_tail: the device sees a full ring for ever.
    SharedWord(hostile.region.field(\.cq_head)).storeRelease(0x8000_0000)
    for i in 0..<4 { hostile.submit(Self.crc(hostile, cookie: 100 + UInt64(i))) }
    #expect(Self.served(honest, cookie: 7), "one engine, wedged by another queue's ring")
    let end = ContinuousClock.now + .seconds(10)
    while dev.queues[0].state != .error && ContinuousClock.now < end { usleep(1000) }
    #expect(dev.queues[0].state == .error)
    #expect(dev.queues[0].droppedCompletionCount >= 1)
    #expect(!dev.isIsolated)
    #expect(Self.served(honest, cookie: 8))
  }

  /// Found by `fuzz/ring` (hostile driver): a NOP's offsets are never validated, yet
  /// the device turned them into pointers, and an offset past `Int.max` trapped the
  /// whole process. A NOP now touches nothing, whatever its offsets say.
  @Test(arguments: [UInt64.max, 1 << 63, 0]) func aNOPWithAnyOffsetCompletesAndHurtsNoOne(offset: UInt64) throws {
    let dev = try Self.device(queues: 2)
    defer { dev.stop() }
    let hostile = try RawQueue(dev.exportQueue(0))
    let honest = try RawQueue(dev.exportQueue(1))
    var nop = accel_sqe()
    nop.cookie = 9
    nop.opcode = UInt8(ACCEL_OP_NOP.rawValue)
    nop.src_offset = offset
    nop.dst_offset = offset
    nop.src_length = 64
    nop.dst_capacity = 64
    hostile.submit(nop)
    let c = try #require(hostile.next(timeout: .seconds(10)))
    #expect(c.cookie == 9 && c.produced == 0 && c.consumed == 0)
    #expect(Self.served(honest, cookie: 10))
  }
}
