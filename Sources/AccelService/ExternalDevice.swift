internal import AccelABI
internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import Logging
internal import Synchronization
import Glibc

/// A standalone device daemon as the gateway sees it: attach, watch the
/// heartbeat, and when the daemon dies fail fast (or fail over to the software
/// fallback) and keep trying to reattach.
final class ExternalDevice: Sendable {
  let address: String
  let queueCount: Int
  let weight: UInt32
  let driverConfiguration: DriverConfiguration
  let logger: Logger
  /// The stand-in device, when the software fallback is enabled.
  let fallback: FallbackDevice?
  private let client = Mutex<DeviceClient?>(nil)
  private let stopped = Atomic<Bool>(false)
  /// How often a lost device is retried.
  static let retryInterval: Duration = .milliseconds(500)

  init(
    address: String, queueCount: Int, weight: UInt32, driverConfiguration: DriverConfiguration,
    fallback: FallbackDevice?, logger: Logger
  ) {
    self.address = address
    self.queueCount = max(1, queueCount)
    self.weight = weight
    self.driverConfiguration = driverConfiguration
    self.fallback = fallback
    self.logger = logger
  }

  /// Connects, says hello, allocates the queues and returns a driver over them.
  func connect() throws -> DeviceDriver {
    let c = try DeviceClient(address: address)
    var fds: [Int32] = []
    for _ in 0..<queueCount { fds.append(try c.allocateQueue(weight: weight).fd) }
    let driver = try DeviceDriver(queueFileDescriptors: fds, configuration: driverConfiguration)
    driver.regionHost = c
    client.withLock { $0 = c }
    return driver
  }

  /// Watches the daemon; on loss fails over (or detaches) and reattaches when it returns.
  /// When the gateway started on the fallback, this only starts the reattach loop.
  func watch(_ dispatcher: Dispatcher) {
    guard let c = client.withLock({ $0 }) else {
      reconnect(dispatcher)
      return
    }
    c.monitor { [self] reason in
      guard !stopped.load(ordering: .relaxed) else { return }
      let why = "device unavailable: \(reason)"
      if let fallback, let driver = try? fallback.driver() {
        dispatcher.failover(to: driver, oldIsGone: true, reason: why, degraded: "\(why); serving from the software fallback")
      } else {
        dispatcher.detach(reason: why)
      }
      client.withLock { $0 = nil }
      reconnect(dispatcher)
    }
  }

  private func reconnect(_ dispatcher: Dispatcher) {
    Task.detached { [self] in
      while !stopped.load(ordering: .relaxed) {
        try? await Task.sleep(for: Self.retryInterval)
        do {
          let driver = try connect()
          if dispatcher.degraded != nil {
            dispatcher.failover(to: driver, oldIsGone: false, reason: "device is back", degraded: nil)
          } else {
            dispatcher.attach(driver)
          }
          logger.notice("reattached to device", metadata: ["device": "\(address)"])
          watch(dispatcher)
          return
        } catch {
          logger.debug("device still unavailable", metadata: ["error": "\(error)"])
        }
      }
    }
  }

  func stop() {
    stopped.store(true, ordering: .relaxed)
    client.withLock { c in
      c?.stopMonitoring()
      c = nil
    }
    fallback?.stop()
  }
}

/// The software fallback: an embedded emulated device (same shared-memory rings)
/// that serves while the standalone device is down. Built on first use, then
/// kept, parked when idle, for later outages.
final class FallbackDevice: Sendable {
  let configuration: DeviceConfiguration
  let driverConfiguration: DriverConfiguration
  private let built = Mutex<(EmulatedDevice, DeviceDriver)?>(nil)

  init(configuration: DeviceConfiguration, driverConfiguration: DriverConfiguration) {
    self.configuration = configuration
    self.driverConfiguration = driverConfiguration
  }

  var device: EmulatedDevice? { built.withLock { $0?.0 } }

  func driver() throws -> DeviceDriver {
    try built.withLock { b throws -> DeviceDriver in
      if let b { return b.1 }
      var config = configuration
      config.faults = .none
      let device = try EmulatedDevice(configuration: config)
      device.start()
      let driver = try DeviceDriver(
        queueFileDescriptors: (0..<device.queues.count).map { device.exportQueue($0) }, configuration: driverConfiguration)
      driver.regionHost = EmbeddedRegionHost(device: device)
      b = (device, driver)
      return driver
    }
  }

  func stop() {
    guard let (device, driver) = built.withLock({ $0 }) else { return }
    driver.stop()
    device.stop()
  }
}

/// The embedded device as an `ExternalRegionHost`: it maps client memory in
/// this process (a dup of the memfd), where its engines run.
struct EmbeddedRegionHost: ExternalRegionHost {
  let device: EmulatedDevice

  func attachRegion(queueID: UInt32, region: UInt16, fd: Int32, size: UInt64) throws(ControlError) {
    let copy = dup(fd)
    guard copy >= 0 else { throw .io("dup: errno \(errno)") }
    do { try device.attachExternalRegion(queueID: queueID, id: region, fd: copy, size: size) } catch {
      throw .refused(error.description)
    }
  }

  func detachRegion(queueID: UInt32, region: UInt16) { device.detachExternalRegion(queueID: queueID, id: region) }
}
