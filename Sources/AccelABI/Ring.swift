/// Index arithmetic for a ring of free-running 32-bit counters.
///
/// `head` and `tail` only ever increase (wrapping at 2^32); the slot of an
/// index is `index & mask`. This makes full and empty unambiguous without a
/// wasted slot: empty is `tail == head`, full is `tail &- head == entries`.
public struct RingIndex: Sendable, Equatable {
  public let entries: UInt32

  public init(entries: UInt32) {
    precondition(entries.nonzeroBitCount == 1, "ring size must be a power of two")
    self.entries = entries
  }

  @inlinable public var mask: UInt32 { entries &- 1 }
  @inlinable public func slot(_ index: UInt32) -> Int { Int(index & mask) }
  @inlinable public func count(head: UInt32, tail: UInt32) -> UInt32 { tail &- head }
  @inlinable public func isEmpty(head: UInt32, tail: UInt32) -> Bool { tail == head }
  @inlinable public func isFull(head: UInt32, tail: UInt32) -> Bool { tail &- head >= entries }
  @inlinable public func free(head: UInt32, tail: UInt32) -> UInt32 { entries &- (tail &- head) }

  /// A consumer's view of the indices is sane only if the producer is at most
  /// `entries` ahead; anything else means a corrupted or hostile peer.
  @inlinable public func isConsistent(head: UInt32, tail: UInt32) -> Bool { tail &- head <= entries }
}
