import AccelABI
import AccelDriver
import CAccelABI
import Glibc
import Synchronization
import Testing

/// Feeds hostile completions to the driver: none may reach the wrong caller or crash it.
@Suite struct CompletionFuzzTests {
  @Test func forgedDuplicatedAndOversizedCompletionsAreDropped() throws {
    let layout = try RegionLayout(sqEntries: 16, cqEntries: 16, dataPoolBytes: 1 << 20)
    let deviceSide = try QueueRegion.create(layout: layout, queueID: 0, weight: 1, name: "fuzz")
    let driverQueue = DriverQueue(index: 0, region: try QueueRegion.attach(fd: dup(deviceSide.fd)))
    let delivered = Mutex<[UInt64: [DeviceStatus]]>([:])
    var leases: [Lease] = []
    for i in 0..<4 {
      let reserved = driverQueue.reserve(srcLength: 100, dstCapacity: 200) { c in
        delivered.withLock { $0[UInt64(i), default: []].append(c.status) }
      }
      leases.append(try #require(reserved))
    }
    var cqTail: UInt32 = 0
    func post(_ c: accel_cqe) {
      deviceSide.cqe(at: cqTail).pointee = c
      cqTail &+= 1
      SharedWord(deviceSide.field(\.cq_tail)).storeRelease(cqTail)
    }
    var rng = SystemRandomNumberGenerator()
    for round in 0..<2000 {
      var c = accel_cqe()
      switch round % 5 {
      case 0: c.cookie = .random(in: 0...UInt64.max, using: &rng)  // unknown cookie
      case 1: c.cookie = leases[1].cookie ^ (1 << 40)  // stale generation
      case 2:
        c.cookie = leases[2].cookie
        c.produced = 201  // more than the buffer
      case 3:
        c.cookie = leases[3].cookie
        c.status = 999  // unknown status
      default:
        c.cookie = leases[Int(round % 4)].cookie | 0xFFFF  // slot out of range
      }
      post(c)
      if round % 8 == 7 { driverQueue.reap() }
    }
    driverQueue.reap()
    // Forged cookies reach nobody. A malformed entry naming a live job fails that
    // job once, as a device fault, rather than leaving it waiting forever.
    #expect(delivered.withLock { $0 } == [2: [.deviceFault], 3: [.deviceFault]])
    // One genuine completion is delivered exactly once; its duplicate is dropped.
    var good = accel_cqe()
    good.cookie = leases[0].cookie
    good.produced = 150
    post(good)
    post(good)
    driverQueue.reap()
    #expect(delivered.withLock { $0 } == [0: [.ok], 2: [.deviceFault], 3: [.deviceFault]])
    #expect(driverQueue.statistics.invalidCompletions == 2001)
    // Malformed completions for live jobs make the queue suspect: it leaves
    // service until a reset (the driver asks once its in-flight jobs are back).
    #expect(!driverQueue.isHealthy)
    #expect(driverQueue.service.reason?.contains("malformed completion") == true)
    // A producer index that jumps ahead is refused without reading garbage.
    SharedWord(deviceSide.field(\.cq_tail)).storeRelease(cqTail &+ 1000)
    #expect(driverQueue.reap() == 0)
    #expect(!driverQueue.isHealthy, "a corrupt ring takes the queue out of service")
    #expect(delivered.withLock { $0[1] } == [.deviceFault], "its in-flight job fails instead of hanging")
  }
}
