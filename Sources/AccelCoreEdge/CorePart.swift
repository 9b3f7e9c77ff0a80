package import CAccelGRPC

/// One piece of a response message: bytes copied as the call is answered, or
/// bytes the C core sends in place and hands back through `release` when it is
/// done (a result still in the device pool: its lease is released then).
package struct CorePart: @unchecked Sendable {
  let bytes: UnsafeRawBufferPointer
  /// Called once the core no longer needs the bytes; nil: they are copied at once.
  let release: Unmanaged<ReleaseBox>?
  /// Copied now: `bytes` needs to be valid only during `respond`.
  let owned: [UInt8]?

  /// Bytes copied into the response.
  package static func copy(_ bytes: [UInt8]) -> CorePart {
    CorePart(bytes: UnsafeRawBufferPointer(start: nil, count: 0), release: nil, owned: bytes)
  }

  /// Bytes sent without a copy; `release` runs when the core is done with them (on one of its threads).
  package static func inPlace(_ bytes: UnsafeRawBufferPointer, release: @escaping @Sendable () -> Void) -> CorePart {
    CorePart(bytes: bytes, release: Unmanaged.passRetained(ReleaseBox(release)), owned: nil)
  }

  /// A part that was never handed to the core gives its bytes back.
  func releaseUnsent() {
    guard let release else { return }
    release.takeRetainedValue().action()
  }

  /// `body` with the parts as the C API takes them.
  static func withParts<R>(_ parts: [CorePart], _ body: (UnsafeBufferPointer<accel_grpc_part>) -> R) -> R {
    var c = [accel_grpc_part]()
    c.reserveCapacity(parts.count)
    return withExtendedLifetime(parts) {
      for part in parts {
        if let owned = part.owned {
          owned.withUnsafeBytes { b in
            c.append(accel_grpc_part(bytes: b.baseAddress?.assumingMemoryBound(to: UInt8.self), length: b.count, release: nil, context: nil))
          }
        } else {
          c.append(
            accel_grpc_part(
              bytes: part.bytes.baseAddress?.assumingMemoryBound(to: UInt8.self), length: part.bytes.count,
              release: { ctx in ctx.map { Unmanaged<ReleaseBox>.fromOpaque($0).takeRetainedValue().action() } },
              context: part.release?.toOpaque()))
        }
      }
      return c.withUnsafeBufferPointer(body)
    }
  }
}

/// The release action of an in-place part, kept alive until the core calls it.
package final class ReleaseBox: Sendable {
  let action: @Sendable () -> Void
  init(_ action: @escaping @Sendable () -> Void) { self.action = action }
}
