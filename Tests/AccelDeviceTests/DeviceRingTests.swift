import AccelABI
import AccelDevice
import AccelDriver
import CAccelABI
import CAccelSys
import Foundation
import Synchronization
import Testing

/// Drives the emulated device through its real shared-memory interface.
@Suite(.timeLimit(.minutes(2))) struct DeviceRingTests {
  static func device(queues: Int = 1, sq: UInt32 = 8, pool: UInt64 = 4 << 20) throws -> EmulatedDevice {
    let d = try EmulatedDevice(
      configuration: .defaults {
        $0.queueCount = queues
        $0.engineCount = 1
        $0.sqEntries = sq
        $0.dataPoolBytes = pool
        $0.idleSpin = .microseconds(10)
      })
    d.start()
    return d
  }

  /// Writes raw descriptors into a queue, bypassing the driver, and collects raw completions.
  final class RawQueue: @unchecked Sendable {
    let region: QueueRegion
    var tail: UInt32 = 0
    var head: UInt32 = 0
    init(_ fd: Int32) throws { region = try QueueRegion.attach(fd: fd) }

    func submit(_ sqe: accel_sqe) {
      region.sqe(at: tail).pointee = sqe
      tail &+= 1
      SharedWord(region.field(\.sq_tail)).storeRelease(tail)
      SharedMemory.fence()
      if SharedWord(region.field(\.sq_need_wakeup)).loadAcquire() != 0 {
        SharedWord(region.field(\.sq_doorbell)).fetchAdd(1)
        SharedWord(region.field(\.sq_doorbell)).wake()
      }
    }

    func next(timeout: Duration = .seconds(10)) -> accel_cqe? {
      let deadline = ContinuousClock.now + timeout
      while ContinuousClock.now < deadline {
        if SharedWord(region.field(\.cq_tail)).loadAcquire() != head {
          let c = region.cqe(at: head).pointee
          head &+= 1
          SharedWord(region.field(\.cq_head)).storeRelease(head)
          return c
        }
        usleep(100)
      }
      return nil
    }
  }

  @Test func hostileDescriptorsGetErrorCompletionsAndTheDeviceSurvives() throws {
    let dev = try Self.device()
    defer { dev.stop() }
    let q = try RawQueue(dev.exportQueue(0))
    let l = q.region.layout
    let hostile: [(UInt64, UInt32, UInt64, UInt32)] = [
      (0, 64, l.dataOffset, 1024),  // reads the header
      (l.dataOffset, 64, l.sqOffset, 1024),  // writes over the SQ
      (UInt64.max - 8, 64, l.dataOffset, 64),  // wraps
      (l.dataOffset, UInt32.max, l.dataOffset + 4096, 64),  // runs off the end
      (l.regionSize, 1, l.dataOffset, 64),  // just past the region
      (l.dataOffset, 4096, l.dataOffset + 2048, 4096),  // overlap
    ]
    for (i, (so, sl, d, dc)) in hostile.enumerated() {
      var s = accel_sqe()
      s.cookie = UInt64(i) + 100
      s.opcode = UInt8(ACCEL_OP_COMPRESS.rawValue)
      s.algorithm = UInt8(ACCEL_ALG_GZIP.rawValue)
      s.src_offset = so
      s.src_length = sl
      s.dst_offset = d
      s.dst_capacity = dc
      q.submit(s)
      let c = try #require(q.next())
      #expect(c.cookie == s.cookie)
      #expect(c.status == UInt16(ACCEL_STATUS_INVALID_DESCRIPTOR.rawValue))
      #expect(c.error_class == UInt8(ACCEL_ERRCLASS_JOB.rawValue))
      #expect(c.produced == 0)
    }
    // A good job still works afterwards.
    let text = Array("hello hello hello hello".utf8)
    q.region.bytes(at: l.dataOffset).copyMemory(from: text, byteCount: text.count)
    var s = accel_sqe()
    s.cookie = 7
    s.opcode = UInt8(ACCEL_OP_COMPRESS.rawValue)
    s.algorithm = UInt8(ACCEL_ALG_ZLIB.rawValue)
    s.level = 1
    s.src_offset = l.dataOffset
    s.src_length = UInt32(text.count)
    s.dst_offset = l.dataOffset + 4096
    s.dst_capacity = 4096
    q.submit(s)
    let c = try #require(q.next())
    #expect(c.status == 0 && c.produced > 0 && c.engine_ns > 0)
  }

  /// ABI 1.4: the device works on client memory attached as an external region,
  /// refuses spans outside it and unsealed files, and keeps the mapping while a
  /// job runs even if the region is detached.
  @Test func externalRegionsAreReadAndWrittenInPlace() throws {
    let dev = try Self.device()
    defer { dev.stop() }
    let q = try RawQueue(dev.exportQueue(0))
    let size: UInt64 = 1 << 20
    func memfd(sealed: Bool) -> Int32 {
      let fd = accel_memfd_create("client")
      _ = ftruncate(fd, off_t(size))
      if sealed { _ = fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) }
      return fd
    }
    // An unsealed file is refused (it could shrink under the mapping: SIGBUS).
    let loose = memfd(sealed: false)
    #expect(throws: DeviceError.self) { try dev.attachExternalRegion(queueID: q.region.queueID, id: 1, fd: loose, size: size) }
    let fd = memfd(sealed: true)
    let mine = try #require(accel_map_shared(fd, size))
    defer { _ = accel_unmap(mine, size) }
    try dev.attachExternalRegion(queueID: q.region.queueID, id: 2, fd: dup(fd), size: size)
    // A region more than the file holds is refused.
    #expect(throws: DeviceError.self) {
      try dev.attachExternalRegion(queueID: q.region.queueID, id: 3, fd: dup(fd), size: size * 2)
    }
    let text = Array(String(repeating: "client pages, in place. ", count: 400).utf8)
    mine.copyMemory(from: text, byteCount: text.count)
    var s = accel_sqe()
    s.cookie = 1
    s.opcode = UInt8(ACCEL_OP_COMPRESS.rawValue)
    s.algorithm = UInt8(ACCEL_ALG_ZLIB.rawValue)
    s.level = 1
    s.src_region = 2
    s.src_offset = 0
    s.src_length = UInt32(text.count)
    s.dst_region = 2
    s.dst_offset = 65536
    s.dst_capacity = 65536
    q.submit(s)
    var c = try #require(q.next())
    #expect(c.status == 0 && c.produced > 0)
    // Inflate it back, from the client's memory into the client's memory.
    s.cookie = 2
    s.opcode = UInt8(ACCEL_OP_DECOMPRESS.rawValue)
    s.src_offset = 65536
    s.src_length = c.produced
    s.dst_offset = 262_144
    s.dst_capacity = 65536
    q.submit(s)
    c = try #require(q.next())
    #expect(c.status == 0 && c.produced == UInt32(text.count))
    #expect(memcmp(mine + 262_144, text, text.count) == 0)
    // Past the end of the region, or a region that is not attached: refused, nothing written.
    s.cookie = 3
    s.dst_offset = size - 100
    q.submit(s)
    c = try #require(q.next())
    #expect(c.status == UInt16(ACCEL_STATUS_INVALID_DESCRIPTOR.rawValue))
    #expect(dev.detachExternalRegion(queueID: q.region.queueID, id: 2))
    s.cookie = 4
    s.dst_offset = 262_144
    q.submit(s)
    c = try #require(q.next())
    #expect(c.status == UInt16(ACCEL_STATUS_INVALID_DESCRIPTOR.rawValue))
    close(fd)
  }

  @Test func driverRoundTripsManyJobsAcrossRingWraparound() async throws {
    let dev = try Self.device(queues: 2, sq: 8)
    defer { dev.stop() }
    let driver = try DeviceDriver(queueFileDescriptors: [dev.exportQueue(0), dev.exportQueue(1)])
    driver.start()
    defer { driver.stop() }
    // 300 jobs through 8-entry rings: each ring wraps dozens of times.
    let results = Mutex<[Int: Completion]>([:])
    var payloads: [Int: [UInt8]] = [:]
    var leases: [Int: Lease] = [:]
    for job in 0..<300 {
      let data = (0..<(job * 37 % 5000)).map { UInt8(truncatingIfNeeded: $0 &* job) }
      payloads[job] = data
      let q = driver.queues[job % 2]
      var lease: Lease?
      let deadline = ContinuousClock.now + .seconds(20)
      while lease == nil && ContinuousClock.now < deadline {
        lease = q.reserve(srcLength: UInt32(data.count), dstCapacity: UInt32(BufferSizing.compressBound(UInt64(data.count)))) { c in
          results.withLock { $0[job] = c }
        }
        if lease == nil {
          // Ring full: release what has completed, then retry.
          for (j, l) in leases where results.withLock({ $0[j] }) != nil && l.queueIndex == job % 2 {
            verify(job: j, lease: l, queue: driver.queues[l.queueIndex], payload: payloads[j]!, completion: results.withLock { $0[j]! })
            driver.queues[l.queueIndex].release(l)
            leases[j] = nil
          }
          try await Task.sleep(for: .milliseconds(1))
        }
      }
      let l = try #require(lease)
      q.input(l).copyBytes(from: data)
      q.submit([(lease: l, steps: [DeviceStep(.compress, .gzip, level: 1)])])
      leases[job] = l
    }
    let deadline = ContinuousClock.now + .seconds(30)
    while results.withLock({ $0.count }) < 300 && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
    #expect(results.withLock { $0.count } == 300)
    for (j, l) in leases {
      verify(job: j, lease: l, queue: driver.queues[l.queueIndex], payload: payloads[j]!, completion: results.withLock { $0[j]! })
      driver.queues[l.queueIndex].release(l)
    }
    #expect(driver.queues.allSatisfy { $0.statistics.invalidCompletions == 0 })
    #expect(driver.queues.allSatisfy { $0.leasedCount == 0 })
  }

  private func verify(job: Int, lease: Lease, queue: DriverQueue, payload: [UInt8], completion: Completion) {
    #expect(completion.status == .ok, "job \(job)")
    let out = Data(queue.output(lease, count: Int(completion.produced)))
    // gzip trailer: ISIZE is the input length mod 2^32, little-endian.
    let isize = out.suffix(4).enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
    #expect(isize == UInt32(payload.count), "job \(job)")
    #expect(out.prefix(2) == Data([0x1f, 0x8b]))
  }

  @Test func throughputCapSlowsTheEngine() throws {
    let dev = try EmulatedDevice(
      configuration: .defaults {
        $0.queueCount = 1
        $0.engineCount = 1
        $0.engineThroughputCapMBps = 10  // 1 MB takes >= 100 ms
      })
    dev.start()
    defer { dev.stop() }
    let q = try RawQueue(dev.exportQueue(0))
    let l = q.region.layout
    var s = accel_sqe()
    s.opcode = UInt8(ACCEL_OP_COMPRESS.rawValue)
    s.algorithm = UInt8(ACCEL_ALG_DEFLATE_RAW.rawValue)
    s.level = 1
    s.src_offset = l.dataOffset
    s.src_length = 1_000_000
    s.dst_offset = l.dataOffset + 2_000_000
    s.dst_capacity = UInt32(BufferSizing.compressBound(1_000_000))
    q.submit(s)
    let c = try #require(q.next())
    #expect(c.status == 0)
    #expect(c.engine_ns >= 100_000_000, "charged device time follows the cap")
  }
}
