public import CAccelABI

/// The ABI's rules for a submission descriptor, applied by the device to its
/// private copy of every SQE before any byte of the region is touched.
public enum DescriptorRules {
  /// Checks a descriptor against the region geometry.
  /// - Returns: `.ok`, `.invalidDescriptor` for bad offsets, lengths, flags or
  ///   reserved fields, or `.unsupported` for an unknown opcode or algorithm.
  public static func validate(_ sqe: accel_sqe, layout: RegionLayout) -> DeviceStatus {
    guard sqe.reserved == 0, sqe.flags & ~UInt8(ACCEL_SQE_F_KNOWN_MASK) == 0 else { return .invalidDescriptor }
    guard let opcode = DeviceOpcode(rawValue: sqe.opcode) else { return .unsupported }
    switch opcode {
    case .nop:
      return .ok
    case .compress, .decompress:
      guard let alg = DeviceAlgorithm(rawValue: sqe.algorithm), alg == .deflateRaw || alg == .zlib || alg == .gzip
      else { return .unsupported }
      if opcode == .compress && sqe.level > 9 { return .unsupported }
    case .encrypt, .decrypt, .digest:
      return .unsupported
    }
    // Features reserved in this ABI minor must be off.
    guard sqe.key_slot == 0, sqe.stream_ctx == 0, sqe.aux_offset == 0, sqe.aux_length == 0, sqe.flags == 0 else {
      return .invalidDescriptor
    }
    let src = (offset: sqe.src_offset, length: UInt64(sqe.src_length))
    let dst = (offset: sqe.dst_offset, length: UInt64(sqe.dst_capacity))
    guard layout.dataPoolContains(offset: src.offset, length: src.length),
      layout.dataPoolContains(offset: dst.offset, length: dst.length)
    else { return .invalidDescriptor }
    // Out-of-place operations: input and output must not overlap.
    if src.length > 0 && dst.length > 0 && src.offset < dst.offset + dst.length && dst.offset < src.offset + src.length {
      return .invalidDescriptor
    }
    return .ok
  }
}
