import AccelABI
import AccelDevice
import CAccelABI
import Foundation
import Testing

/// Issue 17, finding 9: queue ids wrapped at 2^32 and could then repeat a live
/// queue's id, so `exportQueue(id:)` and `attach-region` named the wrong queue.
@Suite struct QueueIDTests {
  @Test func queueIDsWrapWithoutRepeatingALiveOne() throws {
    let dev = try EmulatedDevice(
      configuration: .defaults {
        $0.queueCount = 0
        $0.firstQueueID = UInt32.max - 1
      })
    defer { dev.stop() }
    let a = try dev.allocateQueue(weight: 1)  // 2^32 - 2
    let b = try dev.allocateQueue(weight: 1)  // 2^32 - 1
    let c = try dev.allocateQueue(weight: 1)  // wraps to 0
    dev.releaseQueue(id: b.id)
    // Round again (as 2^32 allocations would): the counter meets the live ids.
    dev.setNextQueueID(UInt32.max - 1)
    var ids = [a.id, c.id]
    for _ in 0..<3 { ids.append(try dev.allocateQueue(weight: 1).id) }
    // 2^32 - 2 is live: skipped; 2^32 - 1 is free again; 0 is live: skipped.
    #expect(ids == [UInt32.max - 1, 0, UInt32.max, 1, 2])
    #expect(Set(dev.queues.map(\.id)).count == dev.queues.count, "two live queues share an id")
  }
}
