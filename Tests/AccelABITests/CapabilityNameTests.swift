import AccelABI
import Testing

/// Issue 17, finding 23: the daemon's capability list was written by hand and
/// missed zstd and lz4. It is now derived from `DeviceAlgorithm`.
@Suite struct CapabilityNameTests {
  @Test func everyAlgorithmHasOneUniqueCapabilityName() {
    let named = DeviceAlgorithm.allCases.filter { $0 != .none }
    let names = named.compactMap(\.capabilityName)
    #expect(names.count == named.count)
    #expect(Set(names).count == names.count)
    #expect(names.contains("zstd") && names.contains("lz4"))
    #expect(DeviceAlgorithm.none.capabilityName == nil)
  }
}
