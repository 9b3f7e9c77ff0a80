/// Bounds on what the local lane holds for one tenant and for one control
/// connection, and on its control socket (docs/LOCAL_LANE.md, "Quotas").
///
/// A region costs one region id (of the gateway's 4096), its `size` in mapped
/// bytes (the device maps it once per queue), and `1 + queues` descriptors
/// (the gateway's own, and one per queue mapping, in this process for an
/// embedded device or in the daemon's). Exhausting a bound refuses that
/// registration with `{"ok":false,"quota":"local.…","error":"…"}` and never
/// touches what other tenants hold.
public struct LocalLaneQuotas: Sendable, Equatable {
  /// Regions one tenant may hold (registered, or unregistered and still used by calls).
  public var tenantMaxRegions = 1024
  /// Bytes of regions one tenant may hold.
  public var tenantMaxRegionBytes: UInt64 = 64 << 30
  /// Descriptors the gateway and device may hold for one tenant's regions.
  public var tenantMaxDescriptors = 4096
  /// Authenticated control connections one tenant may keep open (each has a thread).
  public var tenantMaxConnections = 64
  /// The same three bounds for one control connection.
  public var connectionMaxRegions = 256
  public var connectionMaxRegionBytes: UInt64 = 16 << 30
  public var connectionMaxDescriptors = 1024
  /// Control connections kept before their first request with a valid API key;
  /// accepting one more closes the oldest of them.
  public var maxUnauthenticatedConnections = 64
  /// Longest a control frame may take once its first byte has arrived.
  public var frameTimeout: Duration = .seconds(5)
  /// Descriptors always left free below RLIMIT_NOFILE: registrations that would
  /// eat into them are refused, so gRPC and control connections can still be accepted.
  public var descriptorReserve = 256

  public init() {}
  public static let defaults = LocalLaneQuotas()
}
