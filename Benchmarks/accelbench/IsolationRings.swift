import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelScheduler
import ArgumentParser
import Foundation

/// Scheduler isolation without gRPC: the same light/heavy mix straight into the
/// dispatcher, so the figure shows the scheduler and device, not the network stack.
struct IsolationInProcess: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "isolation-rings", abstract: "Light-tenant latency under a heavy flood, in-process (no gRPC).")
  @Option var scheduler = "fair"
  @Option var seconds: Double = 8
  @Option var json = ".build-bench/isolation-rings.json"

  func run() async throws {
    let device = try EmulatedDevice(configuration: .defaults { $0.engineThroughputCapMBps = 50 })
    device.start()
    defer { device.stop() }
    let driver = try DeviceDriver(queueFileDescriptors: (0..<device.queues.count).map { device.exportQueue($0) })
    var c = DispatcherConfiguration.defaults
    c.scheduler = scheduler == "fifo" ? .fifo : .fair
    let tenants = ["light", "heavy0", "heavy1"].map { TenantPolicy(id: $0) }
    let d = Dispatcher(driver: driver, configuration: c, tenants: tenants)
    d.start()
    defer { d.shutdown(); driver.stop() }
    let heavy = Corpus.logLike(bytes: 1 << 20)
    let light = Corpus.logLike(bytes: 4096)
    let end = ContinuousClock.now + .seconds(seconds)
    func lightLoop(until: ContinuousClock.Instant) async throws -> [Double] {
      var l: [Double] = []
      while ContinuousClock.now < until {
        let t0 = ContinuousClock.now
        _ = try await d.execute(
          JobRequest(opcode: .compress, algorithm: .gzip, level: 1, input: light, outputCapacity: 8192, tenant: "light"))
        let dt = (ContinuousClock.now - t0).components
        l.append(Double(dt.attoseconds) / 1e12 + Double(dt.seconds) * 1e6)
      }
      return l
    }
    let solo = try await lightLoop(until: .now + .seconds(2))
    var heavyDevice: UInt64 = 0
    var heavyJobs: UInt64 = 0
    let lat = try await withThrowingTaskGroup(of: [Double].self) { g in
      for t in ["heavy0", "heavy1"] {
        for _ in 0..<12 {
          g.addTask {
            var dev: [Double] = []
            while ContinuousClock.now < end {
              if let r = try? await d.execute(
                JobRequest(
                  opcode: .compress, algorithm: .gzip, level: 1, input: heavy,
                  outputCapacity: Int(BufferSizing.compressBound(1 << 20)), tenant: t))
              {
                dev.append(-Double(r.stats.deviceNanoseconds) / 1000)  // negative: heavy device time
              }
            }
            return dev
          }
        }
      }
      g.addTask {
        try await Task.sleep(for: .seconds(1))
        return try await lightLoop(until: end)
      }
      var all: [Double] = []
      for try await x in g {
        for v in x where v < 0 {
          heavyDevice += UInt64(-v)
          heavyJobs += 1
        }
        all += x.filter { $0 >= 0 }
      }
      return all
    }
    let heavyJob = Double(heavyDevice) / Double(max(1, heavyJobs))
    let result = IsolationResult(
      scheduler: scheduler + " (rings)", soloP50Microseconds: percentile(solo, 0.5),
      soloP99Microseconds: percentile(solo, 0.99), floodP50Microseconds: percentile(lat, 0.5),
      floodP99Microseconds: percentile(lat, 0.99), heavyJobDeviceMicroseconds: heavyJob,
      boundMicroseconds: percentile(solo, 0.99) + heavyJob, lightJobs: lat.count)
    print(
      String(
        format: "%@ (rings) light solo p99 %.0f us | under flood p50 %.0f us p99 %.0f us | bound %.0f us", scheduler,
        result.soloP99Microseconds, result.floodP50Microseconds, result.floodP99Microseconds, result.boundMicroseconds))
    try write(result, to: json)
  }
}
