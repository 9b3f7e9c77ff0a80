internal import Glibc

/// Who may serve a control socket that a client sends secrets or queue requests
/// to: the process at the other end (SO_PEERCRED) must run as root, as the
/// client's own user, or as one of `extraUIDs`.
///
/// A Unix socket path is only as trustworthy as its directory: a user who can
/// create the path first (a stale socket, a shared /tmp) would otherwise receive
/// a gateway's queue requests or a client's API key (issue 17, finding 14).
public struct TrustedServer: Sendable, Equatable {
  public var extraUIDs: Set<UInt32>

  public init(extraUIDs: Set<UInt32> = []) { self.extraUIDs = extraUIDs }

  public static var defaults: Self { Self() }

  public func allows(uid: UInt32) -> Bool { uid == 0 || uid == getuid() || extraUIDs.contains(uid) }

  /// Throws unless the connection's peer is trusted; `what` names the socket in the message.
  public func check(_ connection: ControlConnection, what: String) throws(ControlError) {
    guard let peer = connection.peer() else { throw .refused("\(what): cannot tell who serves it (SO_PEERCRED failed)") }
    guard allows(uid: peer.uid) else {
      throw .refused(
        "\(what) is served by uid \(peer.uid) (pid \(peer.pid)), not by root, uid \(getuid()) or an allowed user; refusing to talk to it")
    }
  }
}
