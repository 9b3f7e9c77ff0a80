internal import Synchronization

/// Metric series made once per distinct label values and then found by a
/// typed key. The hot path (every call and every job) hashes a few small
/// values and takes one short lock; the label strings, the registry's name
/// validation and the dynamic casts of a by-name lookup happen only on the
/// first use of a key.
final class SeriesCache<Key: Hashable & Sendable, Series: Sendable>: Sendable {
  private let made = Mutex<[Key: Series]>([:])
  private let make: @Sendable (Key) -> Series

  init(_ make: @escaping @Sendable (Key) -> Series) { self.make = make }

  subscript(_ key: Key) -> Series {
    if let found = made.withLock({ $0[key] }) { return found }
    // Made outside the lock (the registry takes its own); a racing maker's copy is the same series.
    let new = make(key)
    return made.withLock { m in
      if let found = m[key] { return found }
      m[key] = new
      return new
    }
  }
}
