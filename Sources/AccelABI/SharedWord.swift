internal import CAccelSys
import Glibc

/// A 32- or 64-bit word in shared memory with the orderings the ABI uses.
/// Thin wrappers over C11 atomics, so both sides of the ring agree on ordering
/// regardless of language.
public struct SharedWord: @unchecked Sendable {
  public let pointer: UnsafeMutablePointer<UInt32>
  public init(_ pointer: UnsafeMutablePointer<UInt32>) { self.pointer = pointer }

  @inlinable public func loadAcquire() -> UInt32 { _loadAcquire(pointer) }
  @inlinable public func loadRelaxed() -> UInt32 { _loadRelaxed(pointer) }
  @inlinable public func storeRelease(_ v: UInt32) { _storeRelease(pointer, v) }
  @inlinable public func storeSeqCst(_ v: UInt32) { _storeSeqCst(pointer, v) }
  @inlinable @discardableResult public func fetchAdd(_ v: UInt32) -> UInt32 { _fetchAdd(pointer, v) }
  @inlinable @discardableResult public func fetchOr(_ v: UInt32) -> UInt32 { _fetchOr(pointer, v) }
  @inlinable @discardableResult public func fetchAnd(_ v: UInt32) -> UInt32 { _fetchAnd(pointer, v) }

  /// FUTEX_WAKE on this word (shared, cross-process). Returns the number woken.
  @discardableResult public func wake(count: Int32 = .max) -> Int32 { Int32(accel_futex_wake(pointer, count)) }
  /// FUTEX_WAIT while the word equals `expected`, up to `timeoutNanoseconds` (0 = forever).
  public func wait(expected: UInt32, timeoutNanoseconds: UInt64) { _ = accel_futex_wait(pointer, expected, timeoutNanoseconds) }
}

public struct SharedWord64: @unchecked Sendable {
  public let pointer: UnsafeMutablePointer<UInt64>
  public init(_ pointer: UnsafeMutablePointer<UInt64>) { self.pointer = pointer }
  public func loadAcquire() -> UInt64 { accel_load_acquire_u64(pointer) }
  public func storeRelease(_ v: UInt64) { accel_store_release_u64(pointer, v) }
  @discardableResult public func fetchAdd(_ v: UInt64) -> UInt64 { accel_fetch_add_u64(pointer, v) }
}

@usableFromInline func _loadAcquire(_ p: UnsafeMutablePointer<UInt32>) -> UInt32 { accel_load_acquire_u32(p) }
@usableFromInline func _loadRelaxed(_ p: UnsafeMutablePointer<UInt32>) -> UInt32 { accel_load_relaxed_u32(p) }
@usableFromInline func _storeRelease(_ p: UnsafeMutablePointer<UInt32>, _ v: UInt32) { accel_store_release_u32(p, v) }
@usableFromInline func _storeSeqCst(_ p: UnsafeMutablePointer<UInt32>, _ v: UInt32) { accel_store_seqcst_u32(p, v) }
@usableFromInline func _fetchAdd(_ p: UnsafeMutablePointer<UInt32>, _ v: UInt32) -> UInt32 { accel_fetch_add_u32(p, v) }
@usableFromInline func _fetchOr(_ p: UnsafeMutablePointer<UInt32>, _ v: UInt32) -> UInt32 { accel_fetch_or_u32(p, v) }
@usableFromInline func _fetchAnd(_ p: UnsafeMutablePointer<UInt32>, _ v: UInt32) -> UInt32 { accel_fetch_and_u32(p, v) }

/// Process-wide primitives the ring protocol needs.
public enum SharedMemory {
  /// Full barrier between a store and a following load (the doorbell's Dekker check).
  @inlinable public static func fence() { _fence() }
  @inlinable public static func cpuRelax() { _relax() }
  public static func nowNanoseconds() -> UInt64 { accel_now_ns() }
  public static func threadCPUNanoseconds() -> UInt64 { accel_thread_cpu_ns() }
  public static func sleep(nanoseconds: UInt64) { accel_sleep_ns(nanoseconds) }
  /// Zeroes memory in a way the compiler may not elide (secrets in shared buffers).
  public static func secureZero(_ p: UnsafeMutableRawPointer, count: Int) { accel_explicit_zero(p, count) }

  /// Waits on several futex words at once; falls back to a bounded single wait
  /// on kernels without futex_waitv. Returns when woken, a value differs, or the timeout passes.
  public static func waitAny(_ words: [UnsafeMutablePointer<UInt32>], expected: [UInt32], timeoutNanoseconds: UInt64) {
    precondition(words.count == expected.count && !words.isEmpty)
    let rc = words.withUnsafeBufferPointer { w in
      expected.withUnsafeBufferPointer { e in
        w.withMemoryRebound(to: UnsafeMutablePointer<UInt32>?.self) { wp in
          accel_futex_waitv(wp.baseAddress, e.baseAddress, Int32(min(words.count, Int(ACCEL_FUTEX_WAITV_MAX))), timeoutNanoseconds)
        }
      }
    }
    if rc < 0 && accel_errno() == ENOSYS {
      // Old kernel: wait on the first word with a short timeout so others are polled.
      _ = accel_futex_wait(words[0], expected[0], min(timeoutNanoseconds, 1_000_000))
    }
  }
}

@usableFromInline func _fence() { accel_fence_seqcst() }
@usableFromInline func _relax() { accel_cpu_relax() }
