internal import Synchronization

/// Pool bytes held by each tenant's replies that the C core is still sending.
///
/// A result sent from the device pool in place holds its lease until the
/// core has written the bytes to the socket, so a tenant that never reads its
/// responses would pin device memory for everyone. Past `limit` bytes a
/// tenant's next results are copied out of the pool and their leases freed
/// at once, as the grpc-swift edge always does.
final class ReplyPins: Sendable {
  let limit: Int
  private let held = Mutex<[String: Int]>([:])

  init(limit: Int) { self.limit = limit }

  /// Takes `bytes` for `tenant` when they fit under the limit.
  func take(_ bytes: Int, tenant: String) -> Bool {
    held.withLock { h in
      let now = h[tenant, default: 0]
      guard now + bytes <= limit else { return false }
      h[tenant] = now + bytes
      return true
    }
  }

  /// Gives back what `take` took, once the core is done with the bytes.
  func give(_ bytes: Int, tenant: String) {
    held.withLock { h in
      let left = h[tenant, default: 0] - bytes
      h[tenant] = left > 0 ? left : nil
    }
  }

  /// Bytes held now by `tenant` (for tests and metrics).
  func holding(_ tenant: String) -> Int { held.withLock { $0[tenant, default: 0] } }
}
