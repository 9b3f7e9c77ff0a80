public import CAccelABI

/// Geometry of one hardware-queue region, computed once by the device and
/// validated by every driver that attaches. All offsets are from the start of
/// the region and page-aligned.
public struct RegionLayout: Sendable, Equatable {
  public var sqEntries: UInt32
  public var cqEntries: UInt32
  public var sqOffset: UInt64
  public var cqOffset: UInt64
  public var dataOffset: UInt64
  public var dataSize: UInt64
  public var regionSize: UInt64
  /// Key slot table (ABI 1.1); `keySlotCount == 0` means none.
  public var keySlotOffset: UInt64
  public var keySlotCount: UInt32

  public static let pageSize: UInt64 = 4096

  /// Lays out a region with the given ring sizes and data pool.
  /// - Throws: `ABIError.invalidGeometry` unless both ring sizes are powers of two,
  ///   `cqEntries >= sqEntries`, and the pool is non-empty.
  public init(sqEntries: UInt32, cqEntries: UInt32, dataPoolBytes: UInt64, keySlots: UInt32 = 0) throws(ABIError) {
    guard sqEntries.nonzeroBitCount == 1, cqEntries.nonzeroBitCount == 1, cqEntries >= sqEntries,
      sqEntries <= 1 << 16, dataPoolBytes > 0, dataPoolBytes <= 1 << 40, keySlots <= 1 << 16
    else { throw ABIError.invalidGeometry("rings must be powers of two <= 65536 with cq >= sq, pool > 0") }
    self.sqEntries = sqEntries
    self.cqEntries = cqEntries
    self.sqOffset = UInt64(ACCEL_HEADER_SIZE)
    self.cqOffset = Self.alignUp(sqOffset + UInt64(sqEntries) * UInt64(ACCEL_SQE_SIZE), to: Self.pageSize)
    let cqEnd = Self.alignUp(cqOffset + UInt64(cqEntries) * UInt64(ACCEL_CQE_SIZE), to: Self.pageSize)
    self.keySlotCount = keySlots
    self.keySlotOffset = keySlots > 0 ? cqEnd : 0
    self.dataOffset = Self.alignUp(cqEnd + UInt64(keySlots) * UInt64(ACCEL_KEYSLOT_SIZE), to: Self.pageSize)
    self.dataSize = Self.alignUp(dataPoolBytes, to: Self.pageSize)
    self.regionSize = dataOffset + dataSize
  }

  /// Reads and checks the geometry a device wrote into a region header.
  /// - Parameter mappedSize: bytes actually mapped; every area must fit inside.
  public init(validating header: UnsafePointer<accel_region_header>, mappedSize: UInt64) throws(ABIError) {
    let h = header.pointee
    guard h.magic == ACCEL_ABI_MAGIC else { throw ABIError.badMagic(h.magic) }
    guard h.abi_version >> 16 == ACCEL_ABI_VERSION_MAJOR else {
      throw ABIError.versionMismatch(device: h.abi_version, driver: ACCEL_ABI_VERSION)
    }
    guard h.header_size == ACCEL_HEADER_SIZE, h.sqe_size == ACCEL_SQE_SIZE, h.cqe_size == ACCEL_CQE_SIZE else {
      throw ABIError.invalidGeometry("entry or header size differs from this ABI")
    }
    guard h.sq_entries.nonzeroBitCount == 1, h.cq_entries.nonzeroBitCount == 1, h.cq_entries >= h.sq_entries,
      h.sq_entries <= 1 << 16, h.cq_entries <= 1 << 16
    else { throw ABIError.invalidGeometry("ring sizes must be powers of two <= 65536 with cq >= sq") }
    guard h.region_size <= mappedSize else { throw ABIError.invalidGeometry("region larger than the mapping") }
    // Areas are found through the header, not recomputed, so a later minor version may
    // insert areas (key slots, stream contexts). They must lie inside the region, past the
    // header, page-aligned, and must not overlap.
    var areas: [(UInt64, UInt64)] = [
      (h.sq_offset, UInt64(h.sq_entries) * UInt64(ACCEL_SQE_SIZE)),
      (h.cq_offset, UInt64(h.cq_entries) * UInt64(ACCEL_CQE_SIZE)),
      (h.data_offset, h.data_size),
    ]
    if h.keyslot_count > 0 {
      guard h.keyslot_size == ACCEL_KEYSLOT_SIZE, h.keyslot_count <= 1 << 16 else {
        throw ABIError.invalidGeometry("key slot size differs from this ABI")
      }
      areas.append((h.keyslot_offset, UInt64(h.keyslot_count) * UInt64(ACCEL_KEYSLOT_SIZE)))
    }
    for (offset, size) in areas {
      guard offset % Self.pageSize == 0, offset >= UInt64(ACCEL_HEADER_SIZE), size > 0, offset <= h.region_size,
        size <= h.region_size - offset
      else { throw ABIError.invalidGeometry("an area lies outside the region or is misaligned") }
    }
    for i in 0..<areas.count {
      for j in (i + 1)..<areas.count where areas[i].0 < areas[j].0 + areas[j].1 && areas[j].0 < areas[i].0 + areas[i].1 {
        throw ABIError.invalidGeometry("areas overlap")
      }
    }
    self.sqEntries = h.sq_entries
    self.cqEntries = h.cq_entries
    self.sqOffset = h.sq_offset
    self.cqOffset = h.cq_offset
    self.dataOffset = h.data_offset
    self.dataSize = h.data_size
    self.regionSize = h.region_size
    self.keySlotCount = h.keyslot_count
    self.keySlotOffset = h.keyslot_count > 0 ? h.keyslot_offset : 0
  }

  /// Writes identity and geometry into a zeroed header. Device side only.
  public func initialize(header: UnsafeMutablePointer<accel_region_header>, queueID: UInt32, weight: UInt32) {
    header.pointee.magic = ACCEL_ABI_MAGIC
    header.pointee.abi_version = ACCEL_ABI_VERSION
    header.pointee.header_size = ACCEL_HEADER_SIZE
    header.pointee.queue_id = queueID
    header.pointee.region_size = regionSize
    header.pointee.sq_offset = sqOffset
    header.pointee.cq_offset = cqOffset
    header.pointee.data_offset = dataOffset
    header.pointee.data_size = dataSize
    header.pointee.sq_entries = sqEntries
    header.pointee.cq_entries = cqEntries
    header.pointee.sqe_size = ACCEL_SQE_SIZE
    header.pointee.cqe_size = ACCEL_CQE_SIZE
    header.pointee.weight = weight
    header.pointee.keyslot_offset = keySlotOffset
    header.pointee.keyslot_count = keySlotCount
    header.pointee.keyslot_size = keySlotCount > 0 ? ACCEL_KEYSLOT_SIZE : 0
  }

  /// Region offset of 1-based key slot `slot`, or nil when out of range.
  public func keySlot(_ slot: UInt32) -> UInt64? {
    guard slot >= 1, slot <= keySlotCount else { return nil }
    return keySlotOffset + UInt64(slot - 1) * UInt64(ACCEL_KEYSLOT_SIZE)
  }

  /// True when `[offset, offset+length)` lies entirely inside the data pool.
  /// Arithmetic is overflow-safe for any 64-bit inputs.
  @inlinable
  public func dataPoolContains(offset: UInt64, length: UInt64) -> Bool {
    guard offset >= dataOffset else { return false }
    let rel = offset - dataOffset
    return rel <= dataSize && length <= dataSize - rel
  }

  @inlinable
  public static func alignUp(_ value: UInt64, to alignment: UInt64) -> UInt64 {
    (value + alignment - 1) & ~(alignment - 1)
  }
}

/// Errors found while reading or writing the shared layout.
public enum ABIError: Error, Equatable, CustomStringConvertible {
  case badMagic(UInt32)
  case versionMismatch(device: UInt32, driver: UInt32)
  case invalidGeometry(String)

  public var description: String {
    switch self {
    case .badMagic(let m): return "region is not an AccelGate queue (magic 0x\(String(m, radix: 16)))"
    case .versionMismatch(let d, let r):
      return "device ABI \(d >> 16).\(d & 0xffff) is incompatible with driver ABI \(r >> 16).\(r & 0xffff)"
    case .invalidGeometry(let why): return "invalid region geometry: \(why)"
    }
  }
}
