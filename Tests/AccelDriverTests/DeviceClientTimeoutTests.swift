import AccelABI
import AccelDriver
import CAccelABI
import CAccelSys
import Foundation
import Synchronization
import Testing

/// Issue 17, finding 11: the gateway's requests to a device daemon held a lock
/// across a `recv` with no timeout, so a daemon that stopped answering (wedged,
/// not dead) hung the gateway instead of failing it over; and a span's last
/// release sent detach-region, a socket round trip, from the reaper thread.
@Suite(.timeLimit(.minutes(1))) struct DeviceClientTimeoutTests {
  /// A daemon that answers hello and then reads requests without ever answering.
  final class WedgedDaemon: @unchecked Sendable {
    let path: String
    let listener: Int32
    let requests = Atomic<Int>(0)
    private var thread: Thread?

    init() throws {
      path = "/tmp/wedged-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
      listener = accel_unix_listen(path, 0o600)
      try #require(listener >= 0)
      let listener = self.listener
      thread = Thread { [self] in
        let fd = accel_unix_accept(listener)
        guard fd >= 0 else { return }
        let c = ControlConnection(fd: fd)
        guard (try? c.receive(ControlRequest.self)) != nil else { return }
        var hello = ControlResponse(ok: true)
        hello.abi = ACCEL_ABI_VERSION
        try? c.send(hello)
        while (try? c.receive(ControlRequest.self)) != nil { self.requests.add(1, ordering: .relaxed) }
        c.close()
      }
      thread?.start()
    }

    func stop() {
      _ = close(listener)
      unlink(path)
    }
  }

  @Test func aSilentDaemonFailsARequestInsteadOfHangingIt() throws {
    let daemon = try WedgedDaemon()
    defer { daemon.stop() }
    let client = try DeviceClient(address: "unix://\(daemon.path)", replyTimeout: .milliseconds(300))
    let started = ContinuousClock.now
    #expect(throws: ControlError.self) { _ = try client.capabilities() }
    #expect(ContinuousClock.now - started < .seconds(10))
    // The connection was shut down: a late reply can never answer a later request.
    #expect(throws: ControlError.self) { _ = try client.capabilities() }
  }

  @Test func detachingARegionNeverWaitsForTheDaemon() throws {
    let daemon = try WedgedDaemon()
    defer { daemon.stop() }
    let client = try DeviceClient(address: "unix://\(daemon.path)", replyTimeout: .seconds(30))
    let host: any ExternalRegionHost = client
    let started = ContinuousClock.now
    host.detachRegion(queueID: 0, region: 1)
    #expect(ContinuousClock.now - started < .seconds(5), "detach waited for a reply on the caller's thread")
    let end = ContinuousClock.now + .seconds(10)
    while daemon.requests.load(ordering: .relaxed) == 0 && ContinuousClock.now < end { usleep(1000) }
    #expect(daemon.requests.load(ordering: .relaxed) == 1, "the detach was never sent")
  }
}
