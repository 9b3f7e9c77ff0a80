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
