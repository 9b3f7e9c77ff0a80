internal import FoundationEssentials
internal import CAccelSys
import Glibc

/// The device's Unix-socket control channel (the UACCE-style "kernel" side of
/// a standalone device): capability query, queue allocation and release, and a
/// heartbeat. Frames are a little-endian u32 length followed by a JSON object;
/// an `alloc` reply carries the queue's memfd as SCM_RIGHTS ancillary data.
/// Documented in docs/DEVICE_ABI.md §10.
public enum ControlProtocol {
  /// Bumped when a message changes incompatibly; checked in `hello`.
  public static let version = 1
  public static let maxFrame = 64 * 1024
}

public struct ControlRequest: Codable, Sendable {
  public enum Op: String, Codable, Sendable {
    case hello, capabilities, alloc, release, heartbeat
    /// Error counters, isolation and the faults being injected.
    case status
    /// Sets fault injection (`fault`: `MODE[,every=N]…`); needs fault control enabled.
    case inject
    /// Ends a device isolation now; needs fault control enabled.
    case liftIsolation = "lift-isolation"
    /// ABI 1.4: attaches client memory (the memfd passed with SCM_RIGHTS, `size`
    /// bytes) to one of the caller's queues as external region `region`.
    case attachRegion = "attach-region"
    /// ABI 1.4: detaches external region `region` from queue `queue`.
    case detachRegion = "detach-region"
  }
  public var op: Op
  /// hello: the driver's ABI version (`major << 16 | minor`).
  public var abi: UInt32?
  /// alloc: arbitration weight for the new queue.
  public var weight: UInt32?
  /// release: the queue to give back.
  public var queue: UInt32?
  /// inject: the fault plan.
  public var fault: String?
  /// attach-region, detach-region: the external region id (1...4096) on `queue`.
  public var region: UInt16?
  /// attach-region: bytes of the memfd to map.
  public var size: UInt64?
  public init(
    op: Op, abi: UInt32? = nil, weight: UInt32? = nil, queue: UInt32? = nil, fault: String? = nil,
    region: UInt16? = nil, size: UInt64? = nil
  ) {
    self.op = op
    self.region = region
    self.size = size
    self.fault = fault
    self.abi = abi
    self.weight = weight
    self.queue = queue
  }
}

public struct ControlResponse: Codable, Sendable {
  public var ok: Bool
  public var error: String?
  public var abi: UInt32?
  public var device: String?
  public var queue: UInt32?
  public var engines: Int?
  public var queues: Int?
  public var heartbeat: UInt64?
  public var regionBytes: UInt64?
  public var memoryBudget: UInt64?
  public var engineThroughputCapMBps: Double?
  public var algorithms: [String]?
  public var isolated: Bool?
  public var queueErrors: UInt64?
  public var resets: UInt64?
  public var isolations: UInt64?
  public var fault: String?
  /// The quota a refusal ran into (e.g. "max-queues-per-peer").
  public var quota: String?
  public init(ok: Bool, error: String? = nil) {
    self.ok = ok
    self.error = error
  }
  public static func failure(_ why: String) -> Self { Self(ok: false, error: why) }
}

/// Failures on the control channel.
public enum ControlError: Error, CustomStringConvertible, Equatable {
  case io(String)
  case refused(String)
  case protocolViolation(String)
  public var description: String {
    switch self {
    case .io(let s): "device control channel: \(s)"
    case .refused(let s): "device refused: \(s)"
    case .protocolViolation(let s): "device control protocol: \(s)"
    }
  }
}

/// One end of a control connection: framed JSON with optional passed descriptors.
public struct ControlConnection: Sendable {
  public let fd: Int32
  public init(fd: Int32) { self.fd = fd }

  public static func connect(path: String) throws(ControlError) -> ControlConnection {
    let fd = accel_unix_connect(path)
    guard fd >= 0 else { throw .io("connect \(path): \(String(cString: strerror(accel_errno())))") }
    return ControlConnection(fd: fd)
  }

  public func send<T: Encodable>(_ message: T, passing fds: [Int32] = []) throws(ControlError) {
    let body: Data
    do { body = try JSONEncoder().encode(message) } catch { throw .protocolViolation("encode: \(error)") }
    var frame = withUnsafeBytes(of: UInt32(body.count).littleEndian) { Array($0) }
    frame.append(contentsOf: body)
    let rc = fds.withUnsafeBufferPointer { f in
      frame.withUnsafeBytes { accel_send_with_fds(fd, $0.baseAddress, $0.count, f.baseAddress, Int32(f.count)) }
    }
    guard rc == 0 else { throw .io("send: \(String(cString: strerror(accel_errno())))") }
  }

  /// Reads one message and any descriptors passed with it. The caller owns the descriptors.
  ///
  /// `frameTimeout` bounds how long a frame may take once its first byte has
  /// arrived (nil: no bound), so a peer that stops mid-frame cannot hold the
  /// reader. On every failure (EOF mid-frame, timeout, a length of 0 or over
  /// 64 KiB, undecodable JSON) every descriptor received with the frame has
  /// been closed before the error is thrown.
  public func receive<T: Decodable>(_ type: T.Type, frameTimeout: Duration? = nil) throws(ControlError) -> (T, [Int32]) {
    var header = [UInt8](repeating: 0, count: 4)
    // The first byte may take as long as the peer likes (an idle connection).
    var passed = try read(into: &header, range: 0..<1, waitMs: -1, what: "connection closed")
    let deadline = frameTimeout.map { ContinuousClock.now + $0 }
    func left() -> Int32 {
      guard let deadline else { return -1 }
      let rest = deadline - ContinuousClock.now
      return rest <= .zero ? 0 : Int32(clamping: rest.components.seconds * 1000 + rest.components.attoseconds / 1_000_000_000_000_000 + 1)
    }
    func fail(_ e: ControlError) -> ControlError {
      passed.forEach { _ = Glibc.close($0) }
      return e
    }
    do { passed += try read(into: &header, range: 1..<4, waitMs: left(), what: "connection closed mid-frame") } catch {
      throw fail(error)
    }
    let length = Int(header.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) }.littleEndian)
    guard length > 0, length <= ControlProtocol.maxFrame else { throw fail(.protocolViolation("frame of \(length) bytes")) }
    var body = [UInt8](repeating: 0, count: length)
    do { passed += try read(into: &body, range: 0..<length, waitMs: left(), what: "connection closed mid-frame") } catch {
      throw fail(error)
    }
    do {
      return (try JSONDecoder().decode(T.self, from: Data(body)), passed)
    } catch {
      throw fail(.protocolViolation("bad message: \(error)"))
    }
  }

  /// Fills `buffer[range]`; returns the descriptors that came with those bytes
  /// (at most 8 per call; the C side closes the rest, and all of them on failure).
  private func read(into buffer: inout [UInt8], range: Range<Int>, waitMs: Int32, what: String) throws(ControlError) -> [Int32] {
    var fds = [Int32](repeating: -1, count: 8)
    var nfds: Int32 = 0
    let rc = buffer.withUnsafeMutableBytes { b -> Int32 in
      guard let base = b.baseAddress, range.upperBound <= b.count else { return -1 }
      return accel_recv_with_fds(fd, base + range.lowerBound, range.count, &fds, 8, &nfds, waitMs)
    }
    guard rc == 0 else {
      throw .io(accel_errno() == ETIMEDOUT ? "\(what): timed out" : what)
    }
    return Array(fds.prefix(Int(nfds)))
  }

  public func close() { _ = Glibc.close(fd) }

  /// The peer's process, user and group (SO_PEERCRED).
  public func peer() -> (pid: Int32, uid: UInt32, gid: UInt32)? {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
    return accel_peer_cred(fd, &pid, &uid, &gid) == 0 ? (pid, uid, gid) : nil
  }
}
