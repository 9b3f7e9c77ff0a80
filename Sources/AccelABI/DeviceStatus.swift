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
  case badKey = 11
  case badParams = 12
  case verifyFailed = 13
  case moreOutput = 14

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
    case .badKey: "bad key"
    case .badParams: "bad parameters"
    case .verifyFailed: "compress-and-verify mismatch"
    case .moreOutput: "more output pending"
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
  case aes128GCM = 16
  case aes256GCM = 17
  case chacha20Poly1305 = 18
  case sha256 = 32
  case sha384 = 33
  case sha512 = 34
  case hmacSHA256 = 35
  case hmacSHA512 = 36
  case crc32c = 37
  case crc32 = 38
  case adler32 = 39

  /// Key bytes an AEAD algorithm needs (nil for others).
  public var aeadKeyLength: Int? {
    switch self {
    case .aes128GCM: 16
    case .aes256GCM, .chacha20Poly1305: 32
    default: nil
    }
  }

  /// Output bytes of a digest or checksum (nil for others).
  public var digestLength: Int? {
    switch self {
    case .sha256, .hmacSHA256: 32
    case .sha384: 48
    case .sha512, .hmacSHA512: 64
    case .crc32c, .crc32, .adler32: 4
    default: nil
    }
  }

  public var isKeyedDigest: Bool { self == .hmacSHA256 || self == .hmacSHA512 }

  /// The name a device lists among its capabilities (nil for `none`).
  public var capabilityName: String? {
    switch self {
    case .none: nil
    case .deflateRaw: "deflate"
    case .zlib: "zlib"
    case .gzip: "gzip"
    case .zstd: "zstd"
    case .lz4: "lz4"
    case .aes128GCM: "aes-128-gcm"
    case .aes256GCM: "aes-256-gcm"
    case .chacha20Poly1305: "chacha20-poly1305"
    case .sha256: "sha256"
    case .sha384: "sha384"
    case .sha512: "sha512"
    case .hmacSHA256: "hmac-sha256"
    case .hmacSHA512: "hmac-sha512"
    case .crc32c: "crc32c"
    case .crc32: "crc32"
    case .adler32: "adler32"
    }
  }
}

/// Sizes the ABI fixes for crypto jobs.
public enum CryptoSizing {
  public static let tagLength = 16
  public static let nonceLength = 12
  public static let aeadParamsLength = MemoryLayout<accel_aead_params>.size
  public static let maxKeyLength = Int(ACCEL_KEY_MAX)
}

/// Sizing rules the ABI guarantees.
public enum BufferSizing {
  /// Output capacity that always suffices to compress `n` bytes (`accel_compress_bound`).
  public static func compressBound(_ n: UInt64) -> UInt64 { accel_compress_bound(n) }
}

/// Builds the AEAD parameter block (`accel_aead_params` followed by the AAD).
public enum AEADParameters {
  public static func encode(nonce: some Collection<UInt8>, aad: some Collection<UInt8>) -> [UInt8] {
    precondition(nonce.count == CryptoSizing.nonceLength)
    var p = accel_aead_params()
    withUnsafeMutableBytes(of: &p.nonce) { $0.copyBytes(from: nonce) }
    p.aad_length = UInt32(aad.count)
    p.tag_length = UInt32(CryptoSizing.tagLength)
    var out = withUnsafeBytes(of: &p) { Array($0) }
    out.append(contentsOf: aad)
    return out
  }
}
