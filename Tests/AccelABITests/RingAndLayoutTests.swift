import AccelABI
import CAccelABI
import Testing

@Suite struct RingIndexTests {
  @Test func emptyAndFullAcrossWraparound() {
    let ring = RingIndex(entries: 8)
    // Start just below the 32-bit wrap so indices overflow mid-test.
    var head: UInt32 = .max - 3
    var tail: UInt32 = head
    #expect(ring.isEmpty(head: head, tail: tail))
    for _ in 0..<8 {
      #expect(!ring.isFull(head: head, tail: tail))
      tail &+= 1
    }
    #expect(ring.isFull(head: head, tail: tail))
    #expect(ring.count(head: head, tail: tail) == 8)
    #expect(ring.free(head: head, tail: tail) == 0)
    #expect(tail < head, "tail wrapped past 2^32")
    // Slots stay distinct and cover the ring exactly once.
    let slots = Set((0..<8).map { ring.slot(head &+ UInt32($0)) })
    #expect(slots == Set(0..<8))
    for _ in 0..<8 { head &+= 1 }
    #expect(ring.isEmpty(head: head, tail: tail))
  }

  @Test func inconsistentIndicesAreDetected() {
    let ring = RingIndex(entries: 16)
    #expect(ring.isConsistent(head: 10, tail: 26))
    #expect(!ring.isConsistent(head: 10, tail: 27))
    #expect(!ring.isConsistent(head: 11, tail: 10), "tail behind head")
  }
}

@Suite struct RegionLayoutTests {
  @Test func areasArePageAlignedAndDisjoint() throws {
    let l = try RegionLayout(sqEntries: 256, cqEntries: 512, dataPoolBytes: 1 << 20)
    #expect(l.sqOffset == UInt64(ACCEL_HEADER_SIZE))
    #expect(l.cqOffset >= l.sqOffset + 256 * 64)
    #expect(l.dataOffset >= l.cqOffset + 512 * 32)
    for o in [l.sqOffset, l.cqOffset, l.dataOffset, l.regionSize] { #expect(o % 4096 == 0) }
    #expect(l.regionSize == l.dataOffset + l.dataSize)
  }

  @Test func rejectsBadGeometry() {
    #expect(throws: ABIError.self) { try RegionLayout(sqEntries: 100, cqEntries: 128, dataPoolBytes: 4096) }
    #expect(throws: ABIError.self) { try RegionLayout(sqEntries: 128, cqEntries: 64, dataPoolBytes: 4096) }
    #expect(throws: ABIError.self) { try RegionLayout(sqEntries: 64, cqEntries: 64, dataPoolBytes: 0) }
  }

  @Test func headerRoundTripAndVersionCheck() throws {
    let l = try RegionLayout(sqEntries: 64, cqEntries: 64, dataPoolBytes: 65536)
    let h = UnsafeMutablePointer<accel_region_header>.allocate(capacity: 1)
    defer { h.deallocate() }
    h.initialize(to: accel_region_header())
    l.initialize(header: h, queueID: 3, weight: 2)
    #expect(try RegionLayout(validating: h, mappedSize: l.regionSize) == l)
    #expect(throws: ABIError.self) { try RegionLayout(validating: h, mappedSize: l.regionSize - 1) }
    h.pointee.abi_version = 2 << 16
    #expect(throws: ABIError.versionMismatch(device: 2 << 16, driver: ACCEL_ABI_VERSION)) {
      try RegionLayout(validating: h, mappedSize: l.regionSize)
    }
    h.pointee.abi_version = ACCEL_ABI_VERSION
    h.pointee.data_offset += 64
    #expect(throws: ABIError.self) { try RegionLayout(validating: h, mappedSize: l.regionSize) }
    h.pointee.magic = 0
    #expect(throws: ABIError.badMagic(0)) { try RegionLayout(validating: h, mappedSize: l.regionSize) }
  }
}

@Suite struct DescriptorValidationTests {
  let layout = try! RegionLayout(sqEntries: 64, cqEntries: 64, dataPoolBytes: 1 << 20)

  func good() -> accel_sqe {
    var s = accel_sqe()
    s.opcode = UInt8(ACCEL_OP_COMPRESS.rawValue)
    s.algorithm = UInt8(ACCEL_ALG_GZIP.rawValue)
    s.level = 1
    s.src_offset = layout.dataOffset
    s.src_length = 4096
    s.dst_offset = layout.dataOffset + 4096
    s.dst_capacity = 8192
    return s
  }

  @Test func acceptsAWellFormedDescriptor() {
    #expect(DescriptorRules.validate(good(), layout: layout) == .ok)
  }

  @Test func rejectsHostileDescriptors() {
    let l = layout
    let cases: [(String, (inout accel_sqe) -> Void)] = [
      ("src in header", { $0.src_offset = 0 }),
      ("src in rings", { $0.src_offset = l.sqOffset }),
      ("src past end", { $0.src_offset = l.regionSize - 100 }),
      ("src wraps 2^64", { $0.src_offset = .max - 10 }),
      ("dst wraps 2^64", { $0.dst_offset = .max }),
      ("dst beyond pool", { $0.dst_capacity = .max }),
      ("src length beyond pool", { $0.src_length = .max }),
      ("overlap", { $0.dst_offset = $0.src_offset + 100 }),
      ("reserved word", { $0.reserved = 1 }),
      ("unknown flag", { $0.flags = 0x80 }),
      ("reserved key slot", { $0.key_slot = 7 }),
      ("reserved aux", { $0.aux_offset = l.dataOffset }),
    ]
    for (name, mutate) in cases {
      var s = good()
      mutate(&s)
      #expect(DescriptorRules.validate(s, layout: layout) == .invalidDescriptor, "\(name)")
    }
  }

  @Test func externalRegionSpansAreBoundedByTheAttachedRegion() {
    // Region 3 is attached with 64 KiB; nothing else is.
    let sizes: (UInt16) -> UInt64? = { $0 == 3 ? 65536 : nil }
    func check(_ mutate: (inout accel_sqe) -> Void) -> DeviceStatus {
      var s = good()
      mutate(&s)
      return DescriptorRules.validate(s, layout: layout, externalSize: sizes)
    }
    #expect(check { $0.src_region = 3; $0.src_offset = 0 } == .ok)
    #expect(check { $0.src_region = 3; $0.src_offset = 65536 - 4096 } == .ok)
    #expect(check { $0.dst_region = 3; $0.dst_offset = 0 } == .ok)
    // Out of bounds, wrapping, unknown or unattached regions.
    #expect(check { $0.src_region = 3; $0.src_offset = 65536 - 4095 } == .invalidDescriptor)
    #expect(check { $0.src_region = 3; $0.src_offset = .max - 100 } == .invalidDescriptor)
    #expect(check { $0.dst_region = 3; $0.dst_offset = 60000; $0.dst_capacity = .max } == .invalidDescriptor)
    #expect(check { $0.src_region = 4; $0.src_offset = 0 } == .invalidDescriptor)
    // Same offsets in different address spaces do not overlap; in the same one they do.
    #expect(check { $0.src_region = 3; $0.src_offset = 0; $0.dst_region = 3; $0.dst_offset = 2048 } == .invalidDescriptor)
    #expect(check { $0.src_region = 3; $0.src_offset = 0; $0.dst_offset = layout.dataOffset } == .ok)
    // Stream chunks stay in the pool; the new reserved word must be zero.
    #expect(
      check {
        $0.src_region = 3
        $0.src_offset = 0
        $0.flags = UInt8(ACCEL_SQE_F_STREAM | ACCEL_SQE_F_STREAM_START)
        $0.stream_ctx = 1
      } == .invalidDescriptor)
    #expect(check { $0.reserved = 1 } == .invalidDescriptor)
    // Without a table (the default) any region id is refused.
    var s = good()
    s.src_region = 1
    #expect(DescriptorRules.validate(s, layout: layout) == .invalidDescriptor)
  }

  @Test func unknownOpcodeOrAlgorithmIsUnsupported() {
    var s = good()
    s.opcode = 200
    #expect(DescriptorRules.validate(s, layout: layout) == .unsupported)
    s = good()
    s.algorithm = 99
    #expect(DescriptorRules.validate(s, layout: layout) == .unsupported)
    s = good()
    s.level = 10
    #expect(DescriptorRules.validate(s, layout: layout) == .unsupported)
  }

  @Test func fuzzedDescriptorsNeverEscapeThePool() {
    var rng = SystemRandomNumberGenerator()
    for _ in 0..<20_000 {
      var s = good()
      s.src_offset = UInt64.random(in: 0...(layout.regionSize + 8192), using: &rng)
      s.dst_offset = Bool.random() ? .random(in: 0...UInt64.max, using: &rng) : .random(in: 0...layout.regionSize)
      s.src_length = .random(in: 0...UInt32.max, using: &rng) >> UInt32.random(in: 0...31)
      s.dst_capacity = .random(in: 0...UInt32.max, using: &rng) >> UInt32.random(in: 0...31)
      if DescriptorRules.validate(s, layout: layout) == .ok {
        #expect(s.src_offset >= layout.dataOffset && s.src_offset + UInt64(s.src_length) <= layout.regionSize)
        #expect(s.dst_offset >= layout.dataOffset && s.dst_offset + UInt64(s.dst_capacity) <= layout.regionSize)
      }
    }
  }
}
