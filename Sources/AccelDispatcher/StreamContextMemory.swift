package import AccelABI

/// The most memory a device stream context can take, by algorithm, level and
/// direction: what an open stream counts for in the gateway's memory budget.
///
/// The engines allocate their state when a stream opens and keep it until it
/// closes, so a stream is counted at its worst case for as long as it is open.
/// The zstd figures are `ZSTD_estimateCStreamSize(level)` and
/// `ZSTD_estimateDStreamSize(1 << 27)` of libzstd 1.5 (the device caps a
/// decompression window at 2^27 bytes), rounded up; the deflate family is
/// zlib's documented `(1 << (windowBits + 2)) + (1 << (memLevel + 9))` for
/// compression and a 32 KiB window for decompression, plus the stream's own state.
package enum StreamContextMemory {
  /// zstd compression by level (index 0 is unused: level 0 means 3).
  static let zstdCompress: [Int] = [
    0, 1_400_000, 2_100_000, 3_700_000, 5_000_000, 6_100_000, 6_100_000, 9_200_000, 9_200_000, 17_600_000,
    30_200_000, 30_200_000, 55_400_000, 55_400_000, 55_400_000, 72_100_000, 72_100_000, 72_100_000, 72_100_000,
    93_900_000,
  ]
  static let zstdDecompress = 134_800_000
  static let deflateCompress = 280_000
  static let deflateDecompress = 48_000

  package static func bytes(algorithm: DeviceAlgorithm, level: UInt8, compress: Bool) -> Int {
    switch algorithm {
    case .zstd:
      guard compress else { return zstdDecompress }
      let l = level == 0 ? 3 : Int(level)
      return zstdCompress[min(l, zstdCompress.count - 1)]
    default:
      return compress ? deflateCompress : deflateDecompress
    }
  }
}
