import AccelABI
import AccelDriver
import Foundation
import Testing

/// Issue 17, finding 13: a chain takes two SQ entries, yet the driver bounded its
/// jobs, not its entries, by `sq_entries`. With enough chains in flight, it wrote
/// over descriptors the device had not fetched yet.
@Suite struct SubmissionDepthTests {
  static func queue(sqEntries: UInt32) throws -> (QueueRegion, DriverQueue) {
    let layout = try RegionLayout(sqEntries: sqEntries, cqEntries: sqEntries, dataPoolBytes: 1 << 20)
    let device = try QueueRegion.create(layout: layout, queueID: 0, weight: 1, name: "depth")
    return (device, DriverQueue(index: 0, region: try QueueRegion.attach(fd: dup(device.fd))))
  }

  static func reserve(_ q: DriverQueue, chain: Bool) -> Lease? {
    q.reserve(srcLength: 64, dstCapacity: 64, midCapacity: chain ? 64 : 0, handler: { _ in })
  }

  @Test func chainsTakeTwoEntriesEach() throws {
    let (_, q) = try Self.queue(sqEntries: 8)
    var chains: [Lease] = []
    while let l = Self.reserve(q, chain: true) { chains.append(l) }
    #expect(chains.count == 4, "8 SQ entries hold 4 chains")
    #expect(Self.reserve(q, chain: false) == nil)
    q.release(chains.removeLast())
    let single = try #require(Self.reserve(q, chain: false))
    let another = try #require(Self.reserve(q, chain: false))
    #expect(Self.reserve(q, chain: false) == nil, "3 chains and 2 jobs fill 8 entries")
    q.release(single)
    q.release(another)
    for l in chains { q.release(l) }
    var singles: [Lease] = []
    while let l = Self.reserve(q, chain: false) { singles.append(l) }
    #expect(singles.count == 8)
  }
}
