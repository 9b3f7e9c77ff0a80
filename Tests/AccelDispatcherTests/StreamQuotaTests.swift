import AccelABI
import AccelDevice
import AccelDispatcher
import AccelDriver
import AccelScheduler
import Foundation
import Testing

/// Issue 17, finding 5: stream contexts are a shared, scarce resource. A tenant
/// holds at most `maxOpenStreams` of them, and their memory counts in the
/// gateway's memory budget for as long as they are open.
@Suite(.timeLimit(.minutes(2))) struct StreamQuotaTests {
  static func dispatcher(budget: Int? = nil) throws -> (EmulatedDevice, DeviceDriver, Dispatcher) {
    let device = try EmulatedDevice(configuration: .defaults { $0.queueCount = 1; $0.engineCount = 1 })
    device.start()
    let driver = try DeviceDriver(queueFileDescriptors: [device.exportQueue(0)])
    var c = DispatcherConfiguration.defaults
    c.maxQueuedBytes = budget
    let dispatcher = Dispatcher(
      driver: driver, configuration: c,
      tenants: [
        TenantPolicy(id: "hoarder", limits: TenantLimits(maxOpenStreams: 2)),
        TenantPolicy(id: "other", limits: TenantLimits(maxOpenStreams: 2)),
      ])
    return (device, driver, dispatcher)
  }

  static func rejection(_ body: () throws(JobError) -> StreamTarget) -> RejectionReason? {
    do {
      _ = try body()
      return nil
    } catch {
      guard case .rejected(let reason, _) = error else { return nil }
      return reason
    }
  }

  @Test func aTenantHoldsAtMostItsOpenStreamsAndOthersAreUnaffected() throws {
    let (device, driver, d) = try Self.dispatcher()
    defer { d.shutdown(); driver.stop(); device.stop() }
    let first = try d.openStream(tenant: "hoarder")
    _ = try d.openStream(tenant: "hoarder")
    #expect(Self.rejection { () throws(JobError) in try d.openStream(tenant: "hoarder") } == .tenantStreams)
    #expect(d.openStreamCount(tenant: "hoarder") == 2)
    let others = try d.openStream(tenant: "other")
    #expect(others.tenant == "other")
    d.closeStream(first)
    #expect(d.openStreamCount(tenant: "hoarder") == 1)
    _ = try d.openStream(tenant: "hoarder")
  }

  @Test func openStreamsCountInTheMemoryBudget() throws {
    let (device, driver, d) = try Self.dispatcher(budget: 1000)
    defer { d.shutdown(); driver.stop(); device.stop() }
    let big = try d.openStream(tenant: "hoarder", contextBytes: 600)
    #expect(Self.rejection { () throws(JobError) in try d.openStream(tenant: "other", contextBytes: 600) } == .gatewayMemory)
    _ = try d.openStream(tenant: "other", contextBytes: 300)
    d.closeStream(big)
    _ = try d.openStream(tenant: "other", contextBytes: 600)
  }

  @Test func aStreamsWorstCaseMemoryFollowsItsAlgorithm() {
    let inflate = StreamContextMemory.bytes(algorithm: .gzip, level: 0, compress: false)
    let deflate = StreamContextMemory.bytes(algorithm: .gzip, level: 6, compress: true)
    let zstdFast = StreamContextMemory.bytes(algorithm: .zstd, level: 1, compress: true)
    let zstdMax = StreamContextMemory.bytes(algorithm: .zstd, level: 19, compress: true)
    let unzstd = StreamContextMemory.bytes(algorithm: .zstd, level: 0, compress: false)
    #expect(inflate < deflate && deflate < zstdFast && zstdFast < zstdMax)
    #expect(unzstd >= 1 << 27, "a zstd window may be 2^27 bytes")
    #expect(StreamContextMemory.bytes(algorithm: .zstd, level: 0, compress: true) == StreamContextMemory.bytes(algorithm: .zstd, level: 3, compress: true))
  }
}
