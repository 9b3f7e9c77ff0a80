internal import Glibc

/// Private memory one engine thread keeps for compress-and-verify.
///
/// A verified compression runs entirely on private copies: the input is
/// snapshotted out of shared memory, compressed into `output`, verified there,
/// and only then copied to the descriptor's destination. A peer that rewrites its
/// own buffers mid-job (the gateway's pool in daemon mode, a local-lane client's
/// region) therefore cannot make a verification fail: a mismatch is always the
/// device's own fault, and only device faults count toward isolation.
///
/// Both buffers grow on demand and are given back after a job that needed more
/// than `retainedBytes`, so one large job does not pin its memory for ever.
final class EngineScratch {
  /// Capacity kept between jobs; larger buffers are freed after use.
  static let retainedBytes = 4 << 20

  private(set) var input: UnsafeMutableRawPointer?
  private(set) var output: UnsafeMutableRawPointer?
  private var inputCapacity = 0
  private var outputCapacity = 0

  deinit {
    free(input)
    free(output)
  }

  /// Buffers of at least `inputBytes` and `outputBytes` (at least 1 byte each), or nil when out of memory.
  func reserve(inputBytes: Int, outputBytes: Int) -> (UnsafeMutableRawPointer, UnsafeMutableRawPointer)? {
    guard Self.grow(&input, &inputCapacity, to: inputBytes), Self.grow(&output, &outputCapacity, to: outputBytes),
      let input, let output
    else { return nil }
    return (input, output)
  }

  /// Frees buffers above `retainedBytes` (called after each job).
  func trim() {
    if inputCapacity > Self.retainedBytes { Self.drop(&input, &inputCapacity) }
    if outputCapacity > Self.retainedBytes { Self.drop(&output, &outputCapacity) }
  }

  /// Bytes held now (for tests).
  var heldBytes: Int { inputCapacity + outputCapacity }

  private static func grow(_ p: inout UnsafeMutableRawPointer?, _ capacity: inout Int, to bytes: Int) -> Bool {
    let need = max(1, bytes)
    guard capacity < need else { return true }
    guard let fresh = realloc(p, need) else { return false }
    p = fresh
    capacity = need
    return true
  }

  private static func drop(_ p: inout UnsafeMutableRawPointer?, _ capacity: inout Int) {
    free(p)
    p = nil
    capacity = 0
  }
}
