internal import CAccelABI

/// Swift view of `enum accel_status`: how a job completed on the device.
public enum DeviceStatus: UInt16, Sendable, CaseIterable, CustomStringConvertible {
  case ok = 0
  case invalidDescriptor = 1
  case unsupported = 2
  case corruptInput = 3
  case outputOverflow = 4
  case checksumMismatch = 5
  case truncatedInput = 6
  case authFailed = 7
  case engineError = 8
  case queueStopped = 9
  case deviceFault = 10

  /// Which side is at fault, as the ABI defines it (see `accel_status_error_class`).
  public var errorClass: DeviceErrorClass {
    DeviceErrorClass(rawValue: accel_status_error_class(rawValue)) ?? .queue
  }

  public var description: String {
    switch self {
    case .ok: "ok"
    case .invalidDescriptor: "invalid descriptor"
    case .unsupported: "unsupported operation"
    case .corruptInput: "corrupt input"
    case .outputOverflow: "output overflow"
    case .checksumMismatch: "checksum mismatch"
    case .truncatedInput: "truncated input"
    case .authFailed: "authentication failed"
    case .engineError: "engine error"
    case .queueStopped: "queue stopped"
    case .deviceFault: "device fault"
    }
  }
}

/// Swift view of `enum accel_error_class`.
public enum DeviceErrorClass: UInt8, Sendable {
  case none = 0
  /// The job's own fault; returned to its caller.
  case job = 1
  /// The queue's fault; counts toward isolation and the job may be retried elsewhere.
  case queue = 2
}

/// Operations a descriptor can carry (`enum accel_opcode`).
public enum DeviceOpcode: UInt8, Sendable {
  case nop = 0
  case compress = 1
  case decompress = 2
  case encrypt = 3
  case decrypt = 4
  case digest = 5
}

/// Algorithms a descriptor can name (`enum accel_algorithm`).
public enum DeviceAlgorithm: UInt8, Sendable, CaseIterable {
  case none = 0
  case deflateRaw = 1
  case zlib = 2
  case gzip = 3
  case zstd = 4
  case lz4 = 5
}

/// Sizing rules the ABI guarantees.
public enum BufferSizing {
  /// Output capacity that always suffices to compress `n` bytes (`accel_compress_bound`).
  public static func compressBound(_ n: UInt64) -> UInt64 { accel_compress_bound(n) }
}
