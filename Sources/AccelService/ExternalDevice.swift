internal import AccelDispatcher
internal import AccelDriver
internal import Logging
internal import Synchronization

/// A standalone device daemon as the gateway sees it: attach, watch the
/// heartbeat, and when the daemon dies fail fast and keep trying to reattach.
final class ExternalDevice: Sendable {
  let address: String
  let queueCount: Int
  let weight: UInt32
  let logger: Logger
  private let client = Mutex<DeviceClient?>(nil)
  private let stopped = Atomic<Bool>(false)
  /// How often a lost device is retried.
  static let retryInterval: Duration = .milliseconds(500)

  init(address: String, queueCount: Int, weight: UInt32, logger: Logger) {
    self.address = address
    self.queueCount = max(1, queueCount)
    self.weight = weight
    self.logger = logger
  }

  /// Connects, says hello, allocates the queues and returns a driver over them.
  func connect() throws -> DeviceDriver {
    let c = try DeviceClient(address: address)
    var fds: [Int32] = []
    for _ in 0..<queueCount { fds.append(try c.allocateQueue(weight: weight).fd) }
    let driver = try DeviceDriver(queueFileDescriptors: fds)
    client.withLock { $0 = c }
    return driver
  }

  /// Watches the daemon; on loss detaches the dispatcher and reattaches when it returns.
  func watch(_ dispatcher: Dispatcher) {
    guard let c = client.withLock({ $0 }) else { return }
    c.monitor { [self] reason in
      guard !stopped.load(ordering: .relaxed) else { return }
      dispatcher.detach(reason: "device unavailable: \(reason)")
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
          dispatcher.attach(driver)
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
  }
}
