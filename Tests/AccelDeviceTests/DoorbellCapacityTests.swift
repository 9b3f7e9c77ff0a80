import AccelABI
import AccelDevice
import CAccelABI
import Foundation
import Testing

/// Issue 17, finding 17: an idle engine parks on every doorbell and the control
/// word with one futex_waitv, which takes at most 128 words. With 128 queues the
/// last doorbell was never waited on, so that queue's jobs waited for the park
/// timeout. A device now holds at most 127 queues, and the last one wakes its engine.
@Suite(.timeLimit(.minutes(2))) struct DoorbellCapacityTests {
  static func device(queues: Int) throws -> EmulatedDevice {
    try EmulatedDevice(
      configuration: .defaults {
        $0.queueCount = queues
        $0.engineCount = 1
        $0.sqEntries = 8
        $0.dataPoolBytes = 64 << 10
        $0.keySlots = 0
        $0.idleSpin = .microseconds(10)
        $0.parkTimeout = .seconds(60)
      })
  }

  @Test func aDeviceHoldsNoMoreQueuesThanOneWaitCanWatch() throws {
    #expect(EmulatedDevice.maxQueues == 127)
    #expect(throws: DeviceError.self) { try Self.device(queues: 128) }
    let dev = try Self.device(queues: 127)
    defer { dev.stop() }
    #expect(throws: DeviceError.self) { try dev.allocateQueue(weight: 1) }
  }

  @Test func theLastQueuesDoorbellWakesAParkedEngine() throws {
    let dev = try Self.device(queues: EmulatedDevice.maxQueues)
    dev.start()
    defer { dev.stop() }
    let q = try HostilePeerTests.RawQueue(dev.exportQueue(EmulatedDevice.maxQueues - 1))
    // Let the engine park (it parks for 60 s unless a doorbell rings).
    let end = ContinuousClock.now + .seconds(10)
    while dev.engines[0].parkCount == 0 && ContinuousClock.now < end { usleep(1000) }
    #expect(HostilePeerTests.served(q, cookie: 1, within: .seconds(10)), "the last queue's doorbell did not wake the engine")
  }
}
