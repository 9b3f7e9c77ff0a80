@testable import AccelABI
import Foundation
import Glibc
import Testing

@Suite struct ControlListenerTests {
  static func path() -> String { "/tmp/agl-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock" }

  static func connect(_ path: String) -> ControlConnection? { try? ControlConnection.connect(path: path) }

  static func closedByServer(_ c: ControlConnection, within ms: Int32) -> Bool {
    var p = pollfd(fd: c.fd, events: Int16(POLLIN), revents: 0)
    guard poll(&p, 1, ms) == 1 else { return false }
    var b: UInt8 = 0
    return recv(c.fd, &b, 1, Int32(MSG_DONTWAIT)) <= 0
  }

  struct Hello: Codable { var op: String }

  /// Past the bound, the oldest unauthenticated connection is closed; authenticated ones never are.
  @Test func theOldestUnauthenticatedConnectionMakesRoom() throws {
    let path = Self.path()
    let listener = try ControlListener(
      path: path, mode: 0o660, limits: .init(maxUnauthenticated: 3, frameTimeout: .seconds(5)), name: "t", log: { _ in })
    defer { listener.stop() }
    listener.start { session in
      while let (m, fds) = try? session.receive(Hello.self) {
        fds.forEach { close($0) }
        if m.op == "hello" { session.authenticated() }
        try? session.connection.send(Hello(op: "ok"))
      }
    }
    let greeted = try #require(Self.connect(path))
    defer { greeted.close() }
    try greeted.send(Hello(op: "hello"))
    _ = try greeted.receive(Hello.self)
    var idle: [ControlConnection] = []
    for _ in 0..<6 {
      idle.append(try #require(Self.connect(path)))
      usleep(20_000)
    }
    defer { idle.forEach { $0.close() } }
    usleep(200_000)
    let closed = idle.map { Self.closedByServer($0, within: 100) }
    #expect(closed == [true, true, true, false, false, false], "\(closed)")
    #expect(!Self.closedByServer(greeted, within: 50))
    #expect(listener.counts.evicted == 3)
    #expect(listener.counts.unauthenticated == 3)
  }

  @Test func theSocketModeIsSetBeforeListening() throws {
    let path = Self.path()
    let listener = try ControlListener(path: path, mode: 0o660, limits: .init(), name: "t", log: { _ in })
    defer { listener.stop() }
    var st = stat()
    #expect(stat(path, &st) == 0)
    #expect(st.st_mode & 0o777 == 0o660)
    listener.stop()
    #expect(access(path, F_OK) != 0, "stop() removes the socket file")
  }
}
