internal import CAccelSys
internal import Foundation
internal import Synchronization
import Glibc

/// The listening side of a control socket (the device daemon's and the local
/// lane's), shared so both defend themselves the same way:
///
/// - the backlog is SOMAXCONN, and the socket's mode is set before `listen`,
///   without touching the process-wide umask (`accel_unix_listen`);
/// - `accept` never spins: EMFILE, ENFILE, ENOBUFS and ENOMEM back off
///   (5 ms doubling to 1 s) and are logged once per streak;
/// - a connection is *unauthenticated* until its server says otherwise
///   (`Session.authenticated()`: the daemon after `hello`, the local lane after
///   a request with a valid API key). At most `maxUnauthenticated` are kept:
///   accepting one more closes the oldest, so idle or half-sent connections
///   can never keep an honest client out;
/// - a frame that has begun must be complete within `frameTimeout`, or the
///   connection is closed (`Session.receive`).
///
/// Each connection is served on its own thread (blocking I/O: this is a
/// control plane, never on a job path or a cooperative thread).
package final class ControlListener: @unchecked Sendable {
  package struct Limits: Sendable, Equatable {
    /// Connections kept before they authenticate; the oldest is closed past it.
    package var maxUnauthenticated = 64
    /// Longest a frame may take once its first byte has arrived.
    package var frameTimeout: Duration = .seconds(5)
    package init(maxUnauthenticated: Int = 64, frameTimeout: Duration = .seconds(5)) {
      self.maxUnauthenticated = max(1, maxUnauthenticated)
      self.frameTimeout = frameTimeout
    }
  }

  /// One accepted connection. Its descriptor is closed by the listener when
  /// the serving closure returns, never before (an eviction only shuts it down).
  package final class Session: Sendable {
    /// Unique for the listener's life (descriptor numbers are reused; this is not).
    package let id: UInt64
    package let connection: ControlConnection
    private let listener: ControlListener

    fileprivate init(id: UInt64, connection: ControlConnection, listener: ControlListener) {
      (self.id, self.connection, self.listener) = (id, connection, listener)
    }

    /// The next frame, which must arrive whole within the listener's frame timeout once begun.
    package func receive<T: Decodable>(_ type: T.Type) throws(ControlError) -> (T, [Int32]) {
      try connection.receive(type, frameTimeout: listener.limits.frameTimeout)
    }

    /// Takes the connection out of the unauthenticated set (idempotent).
    package func authenticated() { listener.markAuthenticated(id) }

    /// The peer's process, user and group (SO_PEERCRED).
    package var peer: (pid: Int32, uid: UInt32, gid: UInt32)? { connection.peer() }
  }

  private struct State {
    var nextID: UInt64 = 1
    /// Unauthenticated sessions, oldest first.
    var unauthenticated: [(id: UInt64, fd: Int32)] = []
    /// Every open session's descriptor (still open while listed here).
    var open: [UInt64: Int32] = [:]
    var evicted: UInt64 = 0
    var started = false
  }

  package let path: String
  package let limits: Limits
  private let name: String
  private let listenFD: Int32
  private let running = Atomic<Bool>(true)
  private let state = Mutex(State())
  private let log: @Sendable (String) -> Void

  /// Listens on `path` (a stale socket file there is replaced) with `mode`.
  package init(path: String, mode: Int32, limits: Limits, name: String, log: @escaping @Sendable (String) -> Void)
    throws(ControlError)
  {
    let fd = accel_unix_listen(path, mode)
    guard fd >= 0 else { throw .io("listen \(path): \(String(cString: strerror(accel_errno())))") }
    (self.path, self.limits, self.name, self.listenFD, self.log) = (path, limits, name, fd, log)
  }

  /// Connections open now, and those still unauthenticated (for tests and logs).
  package var counts: (open: Int, unauthenticated: Int, evicted: UInt64) {
    state.withLock { ($0.open.count, $0.unauthenticated.count, $0.evicted) }
  }

  /// Accepts on a dedicated thread until `stop()`; `serve` runs on one thread per connection.
  package func start(serve: @escaping @Sendable (Session) -> Void) {
    let first = state.withLock { s -> Bool in
      defer { s.started = true }
      return !s.started
    }
    guard first else { return }
    let t = Thread { [self] in
      Thread.current.name = name
      acceptLoop(serve)
    }
    t.start()
  }

  /// Stops accepting and removes the socket file. Connections already open are
  /// served until their peers close them.
  package func stop() {
    guard running.exchange(false, ordering: .sequentiallyConsistent) else { return }
    unlink(path)
    // Wakes the accept thread, which closes the listening descriptor itself (so
    // it never calls accept on a number that was closed and reused).
    shutdown(listenFD, Int32(SHUT_RDWR))
    if !state.withLock({ $0.started }) { close(listenFD) }
  }

  private func acceptLoop(_ serve: @escaping @Sendable (Session) -> Void) {
    defer { close(listenFD) }
    var backoffMs: UInt32 = 0
    while running.load(ordering: .acquiring) {
      let fd = accel_unix_accept(listenFD)
      guard fd >= 0 else {
        let e = accel_errno()
        guard running.load(ordering: .acquiring) else { return }
        if e == EINTR || e == ECONNABORTED || e == EAGAIN { continue }
        // Out of descriptors or memory (or anything unexpected): wait, never spin.
        if backoffMs == 0 { log("\(name): accept failed (\(String(cString: strerror(e)))); backing off") }
        backoffMs = min(max(backoffMs * 2, 5), 1000)
        usleep(backoffMs * 1000)
        continue
      }
      backoffMs = 0
      let session = state.withLock { s -> Session in
        let id = s.nextID
        s.nextID += 1
        s.open[id] = fd
        s.unauthenticated.append((id, fd))
        while s.unauthenticated.count > limits.maxUnauthenticated {
          // Still open (its owner closes it only after leaving `open`): shutting
          // it down ends its thread's read, and that thread closes it.
          let oldest = s.unauthenticated.removeFirst()
          shutdown(oldest.fd, Int32(SHUT_RDWR))
          s.evicted += 1
        }
        return Session(id: id, connection: ControlConnection(fd: fd), listener: self)
      }
      let t = Thread { [self] in
        Thread.current.name = "\(name)-conn"
        serve(session)
        state.withLock { s in
          s.open[session.id] = nil
          s.unauthenticated.removeAll { $0.id == session.id }
        }
        session.connection.close()
      }
      t.start()
    }
  }

  private func markAuthenticated(_ id: UInt64) {
    state.withLock { s in s.unauthenticated.removeAll { $0.id == id } }
  }
}
