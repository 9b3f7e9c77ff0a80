public import AccelMessages
internal import AccelABI
internal import CAccelSys
internal import SwiftProtobuf
public import Foundation
import Glibc

/// Client memory shared with a co-located AccelGate gateway: a sealed memfd,
/// mapped here and registered with the gateway, whose device reads and writes
/// these very pages. Fill `bytes`, name spans of it in calls with `span(_:_:)`,
/// read the results back from `bytes`.
///
/// Valid until `LocalLane.unregister` (or the lane closes); the mapping itself
/// stays until the object is gone.
public final class SharedRegion: @unchecked Sendable {
  /// The token calls name.
  public let token: String
  public let size: Int
  /// The memory: write inputs here, read outputs from here.
  public let bytes: UnsafeMutableRawBufferPointer

  init(token: String, base: UnsafeMutableRawPointer, size: Int) {
    self.token = token
    self.size = size
    self.bytes = UnsafeMutableRawBufferPointer(start: base, count: size)
  }

  deinit { _ = accel_unmap(bytes.baseAddress!, UInt64(size)) }

  /// A span for a request's `input_region` (the bytes to read) or `output_region` (the room to write).
  public func span(_ offset: Int, _ length: Int) -> Accelgate_V1_RegionSpan {
    precondition(offset >= 0 && length >= 0 && offset + length <= size, "span outside the region")
    return .with {
      $0.region = token
      $0.offset = UInt64(offset)
      $0.length = UInt64(length)
    }
  }

  /// Copies `data` in at `offset`.
  public func write(_ data: some DataProtocol, at offset: Int) {
    precondition(offset >= 0 && offset + data.count <= size, "write outside the region")
    var o = offset
    for region in data.regions {
      region.withUnsafeBytes { src in
        UnsafeMutableRawBufferPointer(rebasing: bytes[o..<(o + src.count)]).copyMemory(from: src)
      }
      o += region.count
    }
  }

  /// A copy of `count` bytes at `offset`.
  public func read(_ offset: Int, _ count: Int) -> Data {
    precondition(offset >= 0 && count >= 0 && offset + count <= size, "read outside the region")
    return Data(bytes[offset..<(offset + count)])
  }
}

/// Why the local lane refused or failed.
public struct LocalLaneError: Error, CustomStringConvertible {
  public var description: String
  init(_ d: String) { description = d }
}

/// A session with a gateway's local-lane control socket (docs/LOCAL_LANE.md).
///
/// Regions registered on it belong to the API key's tenant and to this
/// connection: closing it (or the process dying) unregisters them once the
/// jobs using them have completed.
public final class LocalLane: @unchecked Sendable {
  private struct Request: Encodable {
    var op: String
    var api_key: String?
    var size: UInt64?
    var region: String?
  }
  private struct Response: Decodable {
    var ok: Bool
    var error: String?
    var region: String?
  }

  private let connection: ControlConnection
  private let apiKey: String?
  private let lock = NSLock()

  /// Connects to `controlSocket` (the gateway's `--local-socket` path + ".ctl" by default).
  /// The gateway at the other end must run as root, as this user or as one of
  /// `trustedUIDs` (SO_PEERCRED), before the API key is sent to it.
  public init(controlSocket: String, apiKey: String?, trustedUIDs: Set<UInt32> = []) throws {
    do { connection = try ControlConnection.connect(path: controlSocket) } catch {
      throw LocalLaneError("cannot reach the local control socket \(controlSocket): \(error)")
    }
    do { try TrustedServer(extraUIDs: trustedUIDs).check(connection, what: "local control socket \(controlSocket)") } catch {
      connection.close()
      throw LocalLaneError("\(error)")
    }
    self.apiKey = apiKey
  }

  deinit { connection.close() }

  /// The control socket path that goes with a local gRPC socket path.
  public static func controlSocket(forGRPCSocket path: String) -> String { path + ".ctl" }

  private func call(_ r: Request, passing fds: [Int32] = []) throws -> Response {
    lock.lock()
    defer { lock.unlock() }
    do {
      try connection.send(r, passing: fds)
      let (reply, extra) = try connection.receive(Response.self)
      extra.forEach { _ = close($0) }
      return reply
    } catch {
      throw LocalLaneError("local control socket: \(error)")
    }
  }

  /// Creates `size` bytes of shared memory (a memfd sealed against shrinking and
  /// growing), maps it and registers it with the gateway.
  public func register(size: Int) throws -> SharedRegion {
    guard size > 0 else { throw LocalLaneError("a region needs at least one byte") }
    let fd = accel_memfd_create("accelgate-local")
    guard fd >= 0 else { throw LocalLaneError("memfd_create failed: errno \(errno)") }
    defer { close(fd) }  // the gateway keeps its own descriptor; the mapping keeps ours alive
    guard ftruncate(fd, off_t(size)) == 0, accel_memfd_seal_size(fd) == 0 else {
      throw LocalLaneError("cannot size and seal the memfd: errno \(errno)")
    }
    guard let base = accel_map_shared(fd, UInt64(size)) else { throw LocalLaneError("mmap failed: errno \(errno)") }
    let reply: Response
    do { reply = try call(Request(op: "register", api_key: apiKey, size: UInt64(size)), passing: [fd]) } catch {
      _ = accel_unmap(base, UInt64(size))
      throw error
    }
    guard reply.ok, let token = reply.region else {
      _ = accel_unmap(base, UInt64(size))
      throw LocalLaneError("register refused: \(reply.error ?? "no reason given")")
    }
    return SharedRegion(token: token, base: base, size: size)
  }

  /// Unregisters a region; returns once the gateway's jobs using it have completed.
  public func unregister(_ region: SharedRegion) throws {
    let reply = try call(Request(op: "unregister", api_key: apiKey, region: region.token))
    guard reply.ok else { throw LocalLaneError("unregister refused: \(reply.error ?? "no reason given")") }
  }
}
