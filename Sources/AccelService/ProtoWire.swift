/// Just enough of the protobuf wire format to find one field's bytes without
/// decoding them: tags, varints, fixed-size and length-delimited values.
enum ProtoWire {
  /// One top-level field as it lies in the buffer.
  struct Field: Equatable {
    var number: UInt32
    var wireType: UInt8
    /// The whole field: tag, length and value.
    var range: Range<Int>
    /// The value (for a length-delimited field, without its length).
    var value: Range<Int>
  }

  static let lengthDelimited: UInt8 = 2

  /// What the scanner reads: bytes by index, in one buffer or across slices.
  protocol Bytes {
    var count: Int { get }
    subscript(i: Int) -> UInt8 { get }
  }

  /// The top-level fields of a serialized message, in order; nil when the
  /// framing is malformed (a truncated value, a varint over 10 bytes, field
  /// number 0, a length past the end) or uses groups (wire types 3 and 4).
  /// Callers then hand the whole message to SwiftProtobuf, which reports the
  /// error exactly as without the network lane (or decodes the groups).
  static func scan(_ bytes: some Bytes) -> [Field]? {
    var fields: [Field] = []
    var i = 0
    while i < bytes.count {
      let start = i
      guard let tag = varint(bytes, at: &i), tag <= UInt64(UInt32.max), tag >> 3 != 0 else { return nil }
      let wireType = UInt8(tag & 7)
      let valueStart: Int
      switch wireType {
      case 0:
        valueStart = i
        guard varint(bytes, at: &i) != nil else { return nil }
      case 1, 5:
        valueStart = i
        let size = wireType == 1 ? 8 : 4
        guard bytes.count - i >= size else { return nil }
        i += size
      case lengthDelimited:
        guard let length = varint(bytes, at: &i), length <= UInt64(bytes.count - i) else { return nil }
        valueStart = i
        i += Int(length)
      default:
        return nil
      }
      fields.append(Field(number: UInt32(tag >> 3), wireType: wireType, range: start..<i, value: valueStart..<i))
    }
    return fields
  }

  /// Reads a base-128 varint at `i`, advancing past it; nil if truncated or over 10 bytes.
  static func varint(_ bytes: some Bytes, at i: inout Int) -> UInt64? {
    var value: UInt64 = 0
    var shift: UInt64 = 0
    while i < bytes.count && shift < 70 {
      let b = bytes[i]
      i += 1
      value |= UInt64(b & 0x7F) << shift
      if b & 0x80 == 0 { return value }
      shift += 7
    }
    return nil
  }

  static func varintSize(_ v: UInt64) -> Int { v == 0 ? 1 : (64 - v.leadingZeroBitCount + 6) / 7 }

  static func writeVarint(_ v: UInt64, into out: UnsafeMutableRawBufferPointer, at i: inout Int) {
    var v = v
    while v >= 0x80 {
      out[i] = UInt8(truncatingIfNeeded: v) | 0x80
      v >>= 7
      i += 1
    }
    out[i] = UInt8(v)
    i += 1
  }
}
