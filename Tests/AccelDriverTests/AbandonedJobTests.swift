import AccelABI
import AccelDriver
import CAccelABI
import Foundation
import Synchronization
import Testing

/// Issue 17, finding 10: a completion timeout failed the job and its owner
/// released the buffers, and with them its hold on a client's region, while an
/// engine stalled on the job could still write to them. Now the lease is parked
/// until the device acknowledges the queue's reset (it does so only once no
/// engine holds a job of the queue).
@Suite struct AbandonedJobTests {
  final class Hold: Sendable {}

  @Test func aTimedOutJobKeepsItsBuffersAndHoldsUntilTheReset() throws {
    let (device, q) = try SubmissionDepthTests.queue(sqEntries: 8)
    let timeout: UInt64 = 1_000_000_000
    var now: UInt64 = 10_000_000_000
    _ = q.maintain(now: now, completionTimeout: timeout)
    let statuses = Mutex<[DeviceStatus]>([])
    let reserved = q.reserve(srcLength: 4096, dstCapacity: 4096, handler: { c in statuses.withLock { $0.append(c.status) } })
    let lease = try #require(reserved)
    q.submit([(lease, [DeviceStep(.compress, .gzip, level: 1)])])
    // The device fetches the job and never answers (a stalled engine).
    now += timeout + 1
    for (handler, completion) in q.maintain(now: now, completionTimeout: timeout).failed { handler(completion) }
    #expect(statuses.withLock { $0 } == [.deviceFault])

    weak var watched: Hold?
    do {
      let hold = Hold()
      watched = hold
      q.release(lease, keepAlive: hold)
    }
    #expect(watched != nil, "the region hold went while the device may still write")
    #expect(q.poolFreeBytes < q.poolCapacity, "the buffers went back to the pool while the device may still write")

    // The driver asks for a reset; until the device acknowledges it, nothing is let go.
    now += 1_000_000
    _ = q.maintain(now: now, completionTimeout: timeout)
    let request = SharedWord(device.field(\.reset_request)).loadAcquire()
    #expect(request != SharedWord(device.field(\.reset_ack)).loadAcquire())
    _ = q.maintain(now: now + 1_000_000, completionTimeout: timeout)
    #expect(watched != nil)
    SharedWord(device.field(\.reset_ack)).storeRelease(request)
    _ = q.maintain(now: now + 2_000_000, completionTimeout: timeout)
    #expect(watched == nil)
    #expect(q.poolFreeBytes == q.poolCapacity && q.leasedCount == 0)
  }
}
