internal import CAccelGRPC

/// One piece of a response message, sent by the C core in place: it holds the
/// bytes until it is done with them and then runs `release` (on one of its
/// threads). A result still in the device pool goes out this way and its
/// lease is released then; an encoded message goes out from the `CoreBuffer`
/// it was encoded into.
package struct CorePart: @unchecked Sendable {
  let bytes: UnsafeRawBufferPointer
  let release: Unmanaged<ReleaseBox>

  /// Bytes sent without a copy; `release` runs when the core is done with them.
  package static func inPlace(_ bytes: UnsafeRawBufferPointer, release: @escaping @Sendable () -> Void) -> CorePart {
    CorePart(bytes: bytes, release: Unmanaged.passRetained(ReleaseBox(release)))
  }

  /// The bytes it sends (for tests and logs; the part must not have been released).
  package var contents: UnsafeRawBufferPointer { bytes }

  /// A part that was never handed to the core gives its bytes back.
  package func releaseUnsent() { release.takeRetainedValue().action() }

  /// The part as the C API takes it; the core then owns the release.
  var cPart: accel_grpc_part {
    accel_grpc_part(
      bytes: bytes.baseAddress?.assumingMemoryBound(to: UInt8.self), length: bytes.count,
      release: { context in context.map { Unmanaged<ReleaseBox>.fromOpaque($0).takeRetainedValue().action() } },
      context: release.toOpaque())
  }
}

/// The release action of a part, kept alive until the core calls it.
package final class ReleaseBox: Sendable {
  let action: @Sendable () -> Void
  init(_ action: @escaping @Sendable () -> Void) { self.action = action }
}
