/// First-fit allocator over a queue's data pool, with coalescing frees.
///
/// Offsets are region offsets, aligned to `alignment` (the ABI's 64 bytes).
/// The free list is kept sorted by offset so neighbours merge on free; the
/// number of extents is bounded by the number of live allocations plus one,
/// which the dispatcher keeps small (the in-flight depth).
/// Not thread-safe: the owning queue serialises access.
package struct PoolAllocator: Sendable {
  package struct Extent: Equatable, Sendable {
    package var offset: UInt64
    package var size: UInt64
  }

  package let base: UInt64
  package let capacity: UInt64
  package let alignment: UInt64
  private(set) package var free: [Extent]
  private(set) package var freeBytes: UInt64

  package init(base: UInt64, capacity: UInt64, alignment: UInt64 = 64) {
    precondition(alignment.nonzeroBitCount == 1 && base % alignment == 0)
    self.base = base
    self.capacity = capacity & ~(alignment - 1)
    self.alignment = alignment
    self.free = self.capacity > 0 ? [Extent(offset: base, size: self.capacity)] : []
    self.freeBytes = self.capacity
  }

  /// Rounds a request up to the allocation granularity (empty requests still take one unit,
  /// so every buffer has a distinct offset).
  package func rounded(_ size: UInt64) -> UInt64 {
    max(alignment, (size + alignment - 1) & ~(alignment - 1))
  }

  /// Largest single allocation that could succeed right now.
  package var largestFree: UInt64 { free.lazy.map(\.size).max() ?? 0 }

  /// Allocates `size` bytes; nil when no extent is large enough.
  package mutating func allocate(_ size: UInt64) -> UInt64? {
    let need = rounded(size)
    guard need <= capacity, let i = free.firstIndex(where: { $0.size >= need }) else { return nil }
    let offset = free[i].offset
    if free[i].size == need {
      free.remove(at: i)
    } else {
      free[i].offset += need
      free[i].size -= need
    }
    freeBytes -= need
    return offset
  }

  /// Allocates `size` bytes as high in the pool as possible, entirely at or
  /// above `floor`; nil when no free extent there is large enough.
  ///
  /// Network-lane staging uses it (see `DriverQueue.stageInput`): staged
  /// payloads stay in the top of the pool while dispatch-time buffers fill it
  /// first-fit from the bottom, so staged buffers never fragment the part of
  /// the pool below `floor`.
  package mutating func allocateHigh(_ size: UInt64, floor: UInt64) -> UInt64? {
    let need = rounded(size)
    guard need <= capacity else { return nil }
    for i in free.indices.reversed() {
      let end = free[i].offset + free[i].size
      guard end >= need, end - need >= max(free[i].offset, floor) else {
        if end <= floor { return nil }  // every extent below is lower still
        continue
      }
      let offset = end - need
      if free[i].size == need { free.remove(at: i) } else { free[i].size -= need }
      freeBytes -= need
      return offset
    }
    return nil
  }

  /// Returns an allocation. `size` must be what was passed to `allocate`.
  package mutating func release(offset: UInt64, size: UInt64) {
    let len = rounded(size)
    precondition(offset >= base && offset + len <= base + capacity, "release outside the pool")
    // Binary search for the first extent after `offset`.
    var lo = 0
    var hi = free.count
    while lo < hi {
      let mid = (lo + hi) / 2
      if free[mid].offset < offset { lo = mid + 1 } else { hi = mid }
    }
    precondition(lo == free.count || offset + len <= free[lo].offset, "double free or overlap")
    precondition(lo == 0 || free[lo - 1].offset + free[lo - 1].size <= offset, "double free or overlap")
    let mergesLeft = lo > 0 && free[lo - 1].offset + free[lo - 1].size == offset
    let mergesRight = lo < free.count && offset + len == free[lo].offset
    switch (mergesLeft, mergesRight) {
    case (true, true):
      free[lo - 1].size += len + free[lo].size
      free.remove(at: lo)
    case (true, false):
      free[lo - 1].size += len
    case (false, true):
      free[lo].offset = offset
      free[lo].size += len
    case (false, false):
      free.insert(Extent(offset: offset, size: len), at: lo)
    }
    freeBytes += len
  }
}
