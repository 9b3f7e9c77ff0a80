public import CAccelABI

/// The ABI's rules for a submission descriptor, applied by the device to its
/// private copy of every SQE before any byte of the region is touched.
public enum DescriptorRules {
  static let compression: Set<UInt8> = [1, 2, 3, 4, 5]
  static let aead: Set<UInt8> = [16, 17, 18]
  static let digests: Set<UInt8> = [32, 33, 34, 35, 36, 37, 38, 39]
  static let keyedDigests: Set<UInt8> = [35, 36]

  /// Checks a descriptor against the region geometry.
  /// - Returns: `.ok`, `.invalidDescriptor` for bad offsets, lengths, flags or
  ///   reserved fields, or `.unsupported` for an unknown opcode or algorithm.
  ///   `externalSize` gives the size of the queue's attached external region with
  ///   an id (ABI 1.4), or nil when no such region is attached.
  public static func validate(
    _ sqe: accel_sqe, layout: RegionLayout, externalSize: (UInt16) -> UInt64? = { _ in nil }
  ) -> DeviceStatus {
    let streamFlags = UInt8(ACCEL_SQE_F_STREAM | ACCEL_SQE_F_STREAM_START | ACCEL_SQE_F_STREAM_FINAL)
    let allowedFlags = UInt8(ACCEL_SQE_F_CHAIN | ACCEL_SQE_F_VERIFY) | streamFlags
    guard sqe.reserved == 0, sqe.flags & ~allowedFlags == 0 else { return .invalidDescriptor }
    guard let opcode = DeviceOpcode(rawValue: sqe.opcode) else { return .unsupported }
    // Streams (1.3): compression only, a context in range, never chained or verified.
    if sqe.flags & UInt8(ACCEL_SQE_F_STREAM) != 0 {
      guard opcode == .compress || opcode == .decompress, sqe.stream_ctx >= 1, sqe.stream_ctx <= ACCEL_STREAM_CTX_MAX,
        sqe.flags & UInt8(ACCEL_SQE_F_CHAIN | ACCEL_SQE_F_VERIFY) == 0
      else { return .invalidDescriptor }
      if sqe.algorithm == 5 { return .unsupported }  // LZ4 streams are not offered
      // Stream chunks stay in the data pool (their contexts live in this region).
      guard sqe.src_region == 0 && sqe.dst_region == 0 else { return .invalidDescriptor }
    } else if sqe.stream_ctx != 0 || sqe.flags & streamFlags != 0 {
      return .invalidDescriptor
    }
    // Compress-and-verify (1.2) only means something for compression.
    if sqe.flags & UInt8(ACCEL_SQE_F_VERIFY) != 0 && opcode != .compress { return .invalidDescriptor }
    var needsKey = false
    var needsAux = false
    switch opcode {
    case .nop:
      return sqe.key_slot == 0 && sqe.aux_offset == 0 && sqe.aux_length == 0 ? .ok : .invalidDescriptor
    case .compress, .decompress:
      guard compression.contains(sqe.algorithm) else { return .unsupported }
      let maxLevel: UInt8 = sqe.algorithm == 4 ? 19 : sqe.algorithm == 5 ? 12 : 9
      if opcode == .compress && sqe.level > maxLevel { return .unsupported }
    case .encrypt, .decrypt:
      guard aead.contains(sqe.algorithm) else { return .unsupported }
      needsKey = true
      needsAux = true
    case .digest:
      guard digests.contains(sqe.algorithm) else { return .unsupported }
      needsKey = keyedDigests.contains(sqe.algorithm)
    }
    if needsKey {
      guard layout.keySlot(sqe.key_slot) != nil else { return .badKey }
    } else if sqe.key_slot != 0 {
      return .invalidDescriptor
    }
    let src = (offset: sqe.src_offset, length: UInt64(sqe.src_length))
    let dst = (offset: sqe.dst_offset, length: UInt64(sqe.dst_capacity))
    /// A buffer lies in the data pool (region 0) or wholly inside an attached external region.
    func contains(_ region: UInt16, _ b: (offset: UInt64, length: UInt64)) -> Bool {
      guard region != 0 else { return layout.dataPoolContains(offset: b.offset, length: b.length) }
      guard let size = externalSize(region) else { return false }
      return b.offset <= size && b.length <= size - b.offset
    }
    guard contains(sqe.src_region, src), contains(sqe.dst_region, dst) else { return .invalidDescriptor }
    // Out-of-place operations: input and output must not overlap (in the same region).
    if sqe.src_region == sqe.dst_region && overlaps(src, dst) { return .invalidDescriptor }
    if needsAux {
      let aux = (offset: sqe.aux_offset, length: UInt64(sqe.aux_length))
      guard aux.length >= UInt64(MemoryLayout<accel_aead_params>.size),
        layout.dataPoolContains(offset: aux.offset, length: aux.length), sqe.dst_region != 0 || !overlaps(aux, dst)
      else { return .badParams }
    } else if sqe.aux_offset != 0 || sqe.aux_length != 0 {
      return .invalidDescriptor
    }
    return .ok
  }

  static func overlaps(_ a: (offset: UInt64, length: UInt64), _ b: (offset: UInt64, length: UInt64)) -> Bool {
    a.length > 0 && b.length > 0 && a.offset < b.offset + b.length && b.offset < a.offset + a.length
  }
}
