package import AccelABI
internal import CAccelABI
internal import Foundation
internal import Synchronization
import Glibc

/// A gateway's session with a standalone device daemon: checks ABI versions,
/// allocates queues (receiving each memfd over SCM_RIGHTS) and keeps the
/// connection open, since closing it gives the queues back.
package final class DeviceClient: @unchecked Sendable {
  package let connection: ControlConnection
  package let deviceABI: UInt32
  private let requestLock = Mutex<Void>(())
  private let monitoring = Atomic<Bool>(false)
  /// Longest wait for a reply. A daemon that does not answer in time is treated
  /// as gone: the connection is shut down (a late reply must never be taken for
  /// the answer to a later request), so the heartbeat fails and the gateway
  /// fails over instead of hanging (issue 17, finding 11).
  package let replyTimeout: Duration
  /// Region attach and detach requests, in order. A detach is queued here and never
  /// runs on its caller's thread: the caller may be the reaper, under the
  /// dispatcher's lock (a span's last release), which must not wait on a socket.
  private let regionRequests = DispatchQueue(label: "accel-device-regions")

  /// Connects to `unix:///path` (or a bare path) and says hello.
  package init(address: String, replyTimeout: Duration = .seconds(2), trusted: TrustedServer = .defaults)
    throws(ControlError)
  {
    self.replyTimeout = replyTimeout
    let path = address.hasPrefix("unix://") ? String(address.dropFirst("unix://".count)) : address
    connection = try ControlConnection.connect(path: path)
    do throws(ControlError) {
      try trusted.check(connection, what: "device socket \(path)")
      try connection.send(ControlRequest(op: .hello, abi: ACCEL_ABI_VERSION))
      try Self.awaitReply(on: connection, within: replyTimeout)
      let (reply, _) = try connection.receive(ControlResponse.self)
      guard reply.ok, let abi = reply.abi else { throw ControlError.refused(reply.error ?? "hello refused") }
      guard abi >> 16 == ACCEL_ABI_VERSION_MAJOR else {
        throw ControlError.refused("device ABI \(abi >> 16).\(abi & 0xffff) is incompatible with driver ABI \(ACCEL_ABI_VERSION_MAJOR).\(ACCEL_ABI_VERSION_MINOR)")
      }
      deviceABI = abi
    } catch {
      connection.close()
      throw error
    }
  }

  deinit {
    monitoring.store(false, ordering: .relaxed)
    connection.close()
  }

  /// One request and its reply; requests from the heartbeat and from callers never interleave.
  private func call(_ request: ControlRequest) throws(ControlError) -> (ControlResponse, [Int32]) {
    try requestLock.withLock { _ throws(ControlError) in
      try connection.send(request)
      try awaitReply()
      return try connection.receive(ControlResponse.self)
    }
  }

  /// Waits up to `replyTimeout` for the reply to arrive; if it does not, shuts
  /// the connection down and throws.
  private func awaitReply() throws(ControlError) { try Self.awaitReply(on: connection, within: replyTimeout) }

  private static func awaitReply(on connection: ControlConnection, within timeout: Duration) throws(ControlError) {
    let ms = Int32(clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
    var p = pollfd(fd: connection.fd, events: Int16(POLLIN), revents: 0)
    var rc: Int32
    repeat { rc = poll(&p, 1, ms) } while rc < 0 && errno == EINTR
    guard rc == 1 else {
      _ = shutdown(connection.fd, Int32(SHUT_RDWR))
      throw .io("the device did not answer within \(ms) ms; the connection was shut down")
    }
  }

  /// Starts a heartbeat thread: every `interval` it asks the daemon for its
  /// heartbeat and calls `onLost` once if the channel breaks or the reply does
  /// not come within `timeout` (a dead daemon is noticed within about 1 s).
  package func monitor(
    interval: Duration = .milliseconds(200), timeout: Duration = .milliseconds(800),
    onLost: @escaping @Sendable (String) -> Void
  ) {
    guard !monitoring.exchange(true, ordering: .relaxed) else { return }
    let t = Thread { [self] in
      Thread.current.name = "accel-heartbeat"
      var reason: String?
      while monitoring.load(ordering: .relaxed) && reason == nil {
        reason = self.beat(timeout: timeout)
        if reason == nil { Thread.sleep(forTimeInterval: Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18) }
      }
      if let reason, monitoring.load(ordering: .relaxed) { onLost(reason) }
    }
    t.start()
  }

  package func stopMonitoring() { monitoring.store(false, ordering: .relaxed) }

  /// One heartbeat; nil if the daemon answered in time, else why not.
  private func beat(timeout: Duration) -> String? {
    requestLock.withLock { _ -> String? in
      do { try connection.send(ControlRequest(op: .heartbeat)) } catch { return "\(error)" }
      var p = pollfd(fd: connection.fd, events: Int16(POLLIN), revents: 0)
      let ms = Int32(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
      guard poll(&p, 1, ms) == 1 else { return "device missed its heartbeat (no reply in \(ms) ms)" }
      do {
        let (reply, fds) = try connection.receive(ControlResponse.self)
        fds.forEach { _ = close($0) }
        return reply.ok ? nil : (reply.error ?? "heartbeat refused")
      } catch { return "\(error)" }
    }
  }

  /// Allocates a queue with an arbitration weight; returns its id and memfd.
  package func allocateQueue(weight: UInt32) throws(ControlError) -> (id: UInt32, fd: Int32) {
    let (reply, fds) = try call(ControlRequest(op: .alloc, weight: weight))
    guard reply.ok, let id = reply.queue, let fd = fds.first else {
      fds.forEach { _ = close($0) }
      throw .refused(reply.error ?? "no queue")
    }
    fds.dropFirst().forEach { _ = close($0) }
    return (id, fd)
  }

  package func release(queue: UInt32) throws(ControlError) {
    let (reply, _) = try call(ControlRequest(op: .release, queue: queue))
    guard reply.ok else { throw .refused(reply.error ?? "release refused") }
  }

  /// Passes a client's memfd to the daemon, which maps it as external region
  /// `region` of queue `queue` (ABI 1.4). Does not take ownership of `fd`.
  package func attachRegion(queue: UInt32, region: UInt16, fd: Int32, size: UInt64) throws(ControlError) {
    let outcome = regionRequests.sync { () -> Result<(ControlResponse, [Int32]), ControlError> in
      do throws(ControlError) {
        return .success(
          try requestLock.withLock { _ throws(ControlError) in
            try connection.send(ControlRequest(op: .attachRegion, queue: queue, region: region, size: size), passing: [fd])
            try awaitReply()
            return try connection.receive(ControlResponse.self)
          })
      } catch {
        return .failure(error)
      }
    }
    let (reply, fds) = try outcome.get()
    fds.forEach { _ = close($0) }
    guard reply.ok else { throw .refused(reply.error ?? "attach-region refused") }
  }

  package func detachRegion(queue: UInt32, region: UInt16) throws(ControlError) {
    let (reply, _) = try call(ControlRequest(op: .detachRegion, queue: queue, region: region))
    guard reply.ok else { throw .refused(reply.error ?? "detach-region refused") }
  }

  package func capabilities() throws(ControlError) -> ControlResponse {
    try call(ControlRequest(op: .capabilities)).0
  }
}

/// Where a driver's queues live, for what only the device can do: map a
/// client's memory into a queue (ABI 1.4 external regions). The embedded
/// device maps it in-process; a standalone daemon gets the memfd over its
/// control socket.
package protocol ExternalRegionHost: Sendable {
  /// Attaches `fd` (not consumed) as region `region` of queue `queueID`.
  func attachRegion(queueID: UInt32, region: UInt16, fd: Int32, size: UInt64) throws(ControlError)
  func detachRegion(queueID: UInt32, region: UInt16)
}

extension DeviceClient: ExternalRegionHost {
  package func attachRegion(queueID: UInt32, region: UInt16, fd: Int32, size: UInt64) throws(ControlError) {
    try attachRegion(queue: queueID, region: region, fd: fd, size: size)
  }
  /// Queued, not waited for (see `regionRequests`); a later attach of the same id runs after it.
  package func detachRegion(queueID: UInt32, region: UInt16) {
    regionRequests.async { [self] in try? detachRegion(queue: queueID, region: region) }
  }
}
