@testable import AccelDriver
import Testing

@Suite struct PoolAllocatorTests {
  @Test func allocationsAreAlignedDisjointAndInside() throws {
    var pool = PoolAllocator(base: 8192, capacity: 1 << 20)
    var live: [(UInt64, UInt64)] = []
    for size in [1, 63, 64, 65, 4096, 100_000, 0] as [UInt64] {
      let allocated = pool.allocate(size)
      let o = try #require(allocated)
      #expect(o % 64 == 0)
      #expect(o >= 8192 && o + pool.rounded(size) <= 8192 + (1 << 20))
      for (lo, len) in live { #expect(o + pool.rounded(size) <= lo || lo + len <= o) }
      live.append((o, pool.rounded(size)))
    }
  }

  @Test func exhaustionReturnsNilAndFreeingRestores() {
    var pool = PoolAllocator(base: 0, capacity: 64 * 10)
    let all = (0..<10).map { _ in pool.allocate(64)! }
    #expect(pool.allocate(1) == nil)
    #expect(pool.freeBytes == 0)
    for o in all { pool.release(offset: o, size: 64) }
    #expect(pool.free == [.init(offset: 0, size: 640)])
    #expect(pool.allocate(640) == 0)
  }

  @Test func fragmentationCoalescesBackToOneExtent() {
    var pool = PoolAllocator(base: 4096, capacity: 4 << 20)
    var rng = SplitMix(seed: 42)
    var live: [UInt64: UInt64] = [:]
    for step in 0..<20_000 {
      if live.isEmpty || (rng.next() % 3 != 0 && live.count < 200) {
        let size = UInt64(rng.next() % 70_000)
        if let o = pool.allocate(size) {
          #expect(live[o] == nil, "offset handed out twice")
          live[o] = size
        } else {
          // Failure is legitimate only when no free extent is big enough.
          #expect(pool.largestFree < pool.rounded(size), "step \(step): allocation failed with room")
        }
      } else {
        let (o, s) = live.randomElement(using: &rng)!
        pool.release(offset: o, size: s)
        live[o] = nil
      }
      // Invariant: free + live == capacity, extents sorted, disjoint and never adjacent.
      let liveBytes = live.values.reduce(0) { $0 + pool.rounded($1) }
      #expect(pool.freeBytes + liveBytes == pool.capacity)
      for (a, b) in zip(pool.free, pool.free.dropFirst()) { #expect(a.offset + a.size < b.offset) }
    }
    for (o, s) in live { pool.release(offset: o, size: s) }
    #expect(pool.free == [.init(offset: 4096, size: 4 << 20)])
  }
}

/// Deterministic generator so a failure can be replayed.
struct SplitMix: RandomNumberGenerator {
  var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}

@Suite struct PoolAllocatorHighTests {
  @Test func highAllocationsFillFromTheTopAndStayAboveTheFloor() {
    var pool = PoolAllocator(base: 4096, capacity: 64 * 100)
    let end: UInt64 = 4096 + 6400
    let floor = end - 64 * 10
    #expect(pool.allocateHigh(64, floor: floor) == end - 64)
    #expect(pool.allocateHigh(100, floor: floor) == end - 64 - 128)
    // A low allocation comes from the bottom, untouched by the high ones.
    #expect(pool.allocate(64) == 4096)
    // 7 units left above the floor: 8 do not fit, 7 do.
    #expect(pool.allocateHigh(64 * 8, floor: floor) == nil)
    #expect(pool.allocateHigh(64 * 7, floor: floor) == floor)
    #expect(pool.allocateHigh(1, floor: floor) == nil, "the zone is full; space below the floor is not used")
    #expect(pool.freeBytes == 6400 - 64 * 11)
  }

  @Test func highAllocationsUseHolesInTheZoneAndMergeOnRelease() {
    var pool = PoolAllocator(base: 0, capacity: 64 * 16)
    let floor: UInt64 = 64 * 8
    let a = pool.allocateHigh(64, floor: floor)!
    let b = pool.allocateHigh(64, floor: floor)!
    let c = pool.allocateHigh(64, floor: floor)!
    let expected: [UInt64] = [64 * 15, 64 * 14, 64 * 13]
    #expect([a, b, c] == expected)
    pool.release(offset: b, size: 64)
    #expect(pool.allocateHigh(64, floor: floor) == b, "the highest hole first")
    #expect(pool.allocateHigh(128, floor: floor) == 64 * 11)
    // A low allocation may use the zone's free space when the bottom is taken.
    #expect(pool.allocate(64 * 8) == 0)
    #expect(pool.allocate(64 * 3) == 64 * 8)
    #expect(pool.allocateHigh(64, floor: floor) == nil)
    let taken: [(UInt64, UInt64)] = [(a, 64), (b, 64), (c, 64), (64 * 11, 128), (0, 64 * 8), (64 * 8, 64 * 3)]
    for (o, n) in taken {
      pool.release(offset: o, size: n)
    }
    #expect(pool.free == [.init(offset: 0, size: 64 * 16)])
  }

  @Test func randomMixesNeverOverlapOrCrossTheFloor() {
    var pool = PoolAllocator(base: 8192, capacity: 1 << 20)
    let floor = pool.base + (1 << 19)
    var rng = SplitMix(seed: 7)
    var live: [(UInt64, UInt64, Bool)] = []
    for _ in 0..<4000 {
      if !live.isEmpty && rng.next() % 3 == 0 {
        let i = Int(rng.next() % UInt64(live.count))
        let (o, n, _) = live.remove(at: i)
        pool.release(offset: o, size: n)
        continue
      }
      let size = rng.next() % 40_000 + 1
      let high = rng.next() % 2 == 0
      guard let o = high ? pool.allocateHigh(size, floor: floor) : pool.allocate(size) else { continue }
      if high { #expect(o >= floor) }
      let len = pool.rounded(size)
      for (lo, n, _) in live { #expect(o + len <= lo || lo + pool.rounded(n) <= o) }
      live.append((o, size, high))
    }
    for (o, n, _) in live { pool.release(offset: o, size: n) }
    #expect(pool.freeBytes == pool.capacity)
  }
}
