package import AccelABI
internal import CAccelABI
import Glibc

/// A gateway's session with a standalone device daemon: checks ABI versions,
/// allocates queues (receiving each memfd over SCM_RIGHTS) and keeps the
/// connection open, since closing it gives the queues back.
package final class DeviceClient: @unchecked Sendable {
  package let connection: ControlConnection
  package let deviceABI: UInt32

  /// Connects to `unix:///path` (or a bare path) and says hello.
  package init(address: String) throws(ControlError) {
    let path = address.hasPrefix("unix://") ? String(address.dropFirst("unix://".count)) : address
    connection = try ControlConnection.connect(path: path)
    do throws(ControlError) {
      try connection.send(ControlRequest(op: .hello, abi: ACCEL_ABI_VERSION))
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

  deinit { connection.close() }

  /// Allocates a queue with an arbitration weight; returns its id and memfd.
  package func allocateQueue(weight: UInt32) throws(ControlError) -> (id: UInt32, fd: Int32) {
    try connection.send(ControlRequest(op: .alloc, weight: weight))
    let (reply, fds) = try connection.receive(ControlResponse.self)
    guard reply.ok, let id = reply.queue, let fd = fds.first else {
      fds.forEach { _ = close($0) }
      throw .refused(reply.error ?? "no queue")
    }
    fds.dropFirst().forEach { _ = close($0) }
    return (id, fd)
  }

  package func release(queue: UInt32) throws(ControlError) {
    try connection.send(ControlRequest(op: .release, queue: queue))
    let (reply, _) = try connection.receive(ControlResponse.self)
    guard reply.ok else { throw .refused(reply.error ?? "release refused") }
  }

  package func capabilities() throws(ControlError) -> ControlResponse {
    try connection.send(ControlRequest(op: .capabilities))
    return try connection.receive(ControlResponse.self).0
  }
}
