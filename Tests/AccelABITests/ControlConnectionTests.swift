import AccelABI
import CAccelSys
import Foundation
import Glibc
import Testing

/// The server side of the control framing: whatever happens to a frame, the
/// descriptors that came with it are closed (docs/DEVICE_ABI.md §10).
@Suite struct ControlConnectionTests {
  /// A connected pair: (server end, client end).
  static func pair() -> (ControlConnection, Int32) {
    var sv: [Int32] = [-1, -1]
    #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &sv) == 0)
    return (ControlConnection(fd: sv[0]), sv[1])
  }

  /// A pipe whose write end is passed: once every copy of it is closed, the read end hangs up.
  static func pipeEnds() -> (read: Int32, write: Int32) {
    var p: [Int32] = [-1, -1]
    #expect(pipe2(&p, O_CLOEXEC) == 0)
    return (p[0], p[1])
  }

  static func writersGone(_ readEnd: Int32) -> Bool {
    var p = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
    return poll(&p, 1, 0) == 1 && (p.revents & Int16(POLLHUP)) != 0
  }

  /// Sends `bytes` with `fds` attached, then closes our copies of the descriptors.
  static func send(_ client: Int32, _ bytes: [UInt8], passing fds: [Int32]) {
    let rc = bytes.withUnsafeBytes { b in fds.withUnsafeBufferPointer { accel_send_with_fds(client, b.baseAddress, b.count, $0.baseAddress, Int32($0.count)) } }
    #expect(rc == 0)
    fds.forEach { close($0) }
  }

  static func frame(_ json: String) -> [UInt8] {
    let body = Array(json.utf8)
    return withUnsafeBytes(of: UInt32(body.count).littleEndian) { Array($0) } + body
  }

  struct Anything: Decodable {}

  @Test(arguments: [2, 4, 9])
  func framesCutShortCloseTheirDescriptors(cut: Int) {
    let (server, client) = Self.pair()
    defer { server.close() }
    let pipe = Self.pipeEnds()
    defer { close(pipe.read) }
    let whole = Self.frame(#"{"op":"heartbeat","queue":1}"#)
    Self.send(client, Array(whole.prefix(cut)), passing: [pipe.write])
    close(client)
    #expect(throws: ControlError.self) { _ = try server.receive(Anything.self) }
    #expect(Self.writersGone(pipe.read), "the descriptor passed with a frame cut at byte \(cut) is still open")
  }

  /// Descriptors that come with the body's first bytes, in the same read that then meets EOF.
  @Test(arguments: [5, 12])
  func descriptorsWithAHalfBodyAreClosed(cut: Int) {
    let (server, client) = Self.pair()
    defer { server.close() }
    let pipe = Self.pipeEnds()
    defer { close(pipe.read) }
    let whole = Self.frame(#"{"op":"heartbeat","queue":1}"#)
    Self.send(client, Array(whole.prefix(4)), passing: [])
    usleep(20_000)
    Self.send(client, Array(whole[4..<cut]), passing: [pipe.write])
    close(client)
    #expect(throws: ControlError.self) { _ = try server.receive(Anything.self) }
    #expect(Self.writersGone(pipe.read), "the descriptor passed with the body's first bytes is still open")
  }

  @Test(arguments: [#"{"op":"heartbeat""#, "[1,2]", ""])
  func undecodableFramesCloseTheirDescriptors(body: String) {
    let (server, client) = Self.pair()
    defer { server.close(); close(client) }
    let pipe = Self.pipeEnds()
    defer { close(pipe.read) }
    struct Op: Decodable { var op: String }
    Self.send(client, body.isEmpty ? [1, 0, 1, 0] : Self.frame(body), passing: [pipe.write])  // "": a length of 64 KiB + 1
    #expect(throws: ControlError.self) { _ = try server.receive(Op.self, frameTimeout: .seconds(2)) }
    #expect(Self.writersGone(pipe.read))
  }

  @Test func aStalledFrameTimesOutAndClosesItsDescriptors() {
    let (server, client) = Self.pair()
    defer { server.close(); close(client) }
    let pipe = Self.pipeEnds()
    defer { close(pipe.read) }
    Self.send(client, [40, 0], passing: [pipe.write])
    let start = ContinuousClock.now
    #expect(throws: ControlError.self) { _ = try server.receive(Anything.self, frameTimeout: .milliseconds(200)) }
    let took = ContinuousClock.now - start
    #expect(took >= .milliseconds(150) && took < .seconds(3), "timed out after \(took)")
    #expect(Self.writersGone(pipe.read))
  }

  @Test func moreThanEightDescriptorsAreAllClosed() {
    let (server, client) = Self.pair()
    defer { server.close(); close(client) }
    let pipes = (0..<8).map { _ in Self.pipeEnds() }
    defer { pipes.forEach { close($0.read) } }
    // Eight in one frame (the most one sendmsg of ours carries); the reader keeps them, the caller closes.
    Self.send(client, Self.frame(#"{"a":1}"#), passing: pipes.map(\.write))
    struct A: Decodable { var a: Int }
    let (_, fds) = (try? server.receive(A.self)) ?? (A(a: 0), [])
    #expect(fds.count == 8)
    fds.forEach { close($0) }
    #expect(pipes.allSatisfy { Self.writersGone($0.read) })
  }
}
