import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import CAccelSys
import Foundation
import Testing

/// Issue 17, finding 7: a local-lane job's input lies in a client's region, so its
/// payload in the gateway is 0 bytes. It used to be costed at 0 bytes too, so span
/// jobs of any size went past the in-flight device-time budget together.
@Suite(.timeLimit(.minutes(2))) struct SpanCostTests {
  typealias Rig = DispatcherTests.Rig

  /// A sealed 2 MiB client region attached to the rig's only queue as region 1.
  static func attachRegion(_ rig: Rig) throws -> Int32 {
    let size: UInt64 = 2 << 20
    let fd = accel_memfd_create("span-cost")
    try #require(fd >= 0)
    try #require(ftruncate(fd, off_t(size)) == 0 && accel_memfd_seal_size(fd) == 0)
    try rig.device.attachExternalRegion(queueID: rig.driver.queues[0].queueID, id: 1, fd: dup(fd), size: size)
    return fd
  }

  static func spanJob(offset: UInt64) -> JobRequest {
    var r = JobRequest(opcode: .compress, algorithm: .gzip, level: 1, input: Data(), outputCapacity: 1 << 20)
    r.input = .span(ExternalSpan(region: 1, offset: offset, length: 1 << 20))
    return r
  }

  @Test func aSpanJobIsCostedByItsSpanLength() {
    let r = Self.spanJob(offset: 0)
    #expect(r.payloadCount == 0)
    #expect(r.deviceInputBytes == 1 << 20)
  }

  /// Two 1 MiB span jobs on a 1 MB/s device with room for four jobs in flight: the
  /// first one's estimate fills the 2 ms budget, so the second waits for it, as it
  /// would inline.
  @Test func spanJobsStayWithinTheInFlightBudget() async throws {
    let rig = try Rig(capMBps: 1, inFlightPerQueue: 4)
    defer { rig.stop() }
    let fd = try Self.attachRegion(rig)
    defer { close(fd) }
    let first = Task { try await rig.dispatcher.execute(Self.spanJob(offset: 0)) }
    try await rig.wait { rig.dispatcher.snapshot.inFlight == [1] }
    let second = Task { try await rig.dispatcher.execute(Self.spanJob(offset: 1 << 20)) }
    try await rig.wait { rig.dispatcher.snapshot.queued == 1 }
    let cost = rig.dispatcher.snapshot.inFlightCost[0]
    #expect(cost >= 1_000_000, "a 1 MiB job estimated at \(cost) ns of device time")
    // The second job waits behind the budget while the first one runs (~1 s): an
    // absence, so it is looked at a little later once more.
    try await Task.sleep(for: .milliseconds(200))
    #expect(rig.dispatcher.snapshot.inFlight == [1])
    #expect(rig.dispatcher.snapshot.queued == 1)
    let a = try await first.value
    let b = try await second.value
    #expect(a.stats.inputBytes == 1 << 20 && b.stats.inputBytes == 1 << 20)
  }
}
