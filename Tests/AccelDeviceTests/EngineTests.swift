import AccelABI
import CAccelABI
import CAccelEngines
import Testing

/// The engines directly: output always fits the ABI's compress bound, and round-trips.
@Suite struct EngineTests {
  static func random(_ n: Int, seed: UInt64) -> [UInt8] {
    var x = seed | 1
    return (0..<n).map { _ in
      x ^= x << 13
      x ^= x >> 7
      x ^= x << 17
      return UInt8(truncatingIfNeeded: x)
    }
  }

  @Test(arguments: [0, 1, 100, 65_535, 65_536, 300_000, 4 << 20])
  func incompressibleInputFitsTheBoundAtEveryLevel(size: Int) throws {
    let ctx = try #require(accel_engine_create())
    defer { accel_engine_destroy(ctx) }
    let input = Self.random(size, seed: UInt64(size) &+ 7)
    let cap = Int(accel_compress_bound(UInt64(size)))
    var out = [UInt8](repeating: 0, count: cap)
    var back = [UInt8](repeating: 0, count: max(1, size))
    let levels: [UInt8] = size > 1 << 20 ? [0, 1, 3, 4, 9] : Array(0...9)
    for alg in [ACCEL_ALG_DEFLATE_RAW, ACCEL_ALG_ZLIB, ACCEL_ALG_GZIP].map({ UInt8($0.rawValue) }) {
      for level in levels {
        var produced: UInt32 = 0
        var consumed: UInt32 = 0
        let st = accel_engine_compress(ctx, alg, level, input, UInt32(size), &out, UInt32(cap), &produced, &consumed)
        #expect(st == 0, "alg \(alg) level \(level) size \(size)")
        #expect(Int(produced) <= cap && consumed == UInt32(size))
        var made: UInt32 = 0
        let st2 = accel_engine_decompress(ctx, alg, out, produced, &back, UInt32(back.count), &made, &consumed)
        #expect(st2 == 0 && made == UInt32(size) && Array(back.prefix(size)) == input, "alg \(alg) level \(level)")
      }
    }
  }

  @Test func decompressionReportsTheRightFailure() throws {
    let ctx = try #require(accel_engine_create())
    defer { accel_engine_destroy(ctx) }
    let gzip = UInt8(ACCEL_ALG_GZIP.rawValue)
    let input = [UInt8](repeating: 65, count: 100_000)
    var packed = [UInt8](repeating: 0, count: Int(accel_compress_bound(100_000)))
    var n: UInt32 = 0
    var used: UInt32 = 0
    #expect(accel_engine_compress(ctx, gzip, 6, input, 100_000, &packed, UInt32(packed.count), &n, &used) == 0)
    let stream = Array(packed.prefix(Int(n)))
    var out = [UInt8](repeating: 0, count: 200_000)
    func run(_ s: [UInt8], cap: Int = 200_000) -> UInt16 {
      var p: UInt32 = 0
      var c: UInt32 = 0
      return accel_engine_decompress(ctx, gzip, s, UInt32(s.count), &out, UInt32(cap), &p, &c)
    }
    #expect(run(stream) == UInt16(ACCEL_STATUS_OK.rawValue))
    #expect(run(stream, cap: 99_999) == UInt16(ACCEL_STATUS_OUTPUT_OVERFLOW.rawValue))
    #expect(run(Array(stream.dropLast(10))) == UInt16(ACCEL_STATUS_TRUNCATED_INPUT.rawValue))
    var badCRC = stream
    badCRC[badCRC.count - 6] ^= 0xFF
    #expect(run(badCRC) == UInt16(ACCEL_STATUS_CHECKSUM_MISMATCH.rawValue))
    #expect(run(stream + [1, 2, 3]) == UInt16(ACCEL_STATUS_CORRUPT_INPUT.rawValue), "trailing garbage")
    #expect(run(stream + stream) == UInt16(ACCEL_STATUS_OK.rawValue), "two gzip members")
    #expect(run([0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff, 0xde, 0xad]) != UInt16(ACCEL_STATUS_OK.rawValue))
  }

  @Test(arguments: [0, 1, 100, 65_536, 300_000, 4 << 20])
  func zstdAndLz4FitTheBoundAndRoundTrip(size: Int) throws {
    let ctx = try #require(accel_engine_create())
    defer { accel_engine_destroy(ctx) }
    let input = Self.random(size, seed: UInt64(size) &+ 11)
    let cap = Int(accel_compress_bound(UInt64(size)))
    var out = [UInt8](repeating: 0, count: cap)
    var back = [UInt8](repeating: 0, count: max(1, size))
    for (alg, levels) in [(UInt8(ACCEL_ALG_ZSTD.rawValue), [1, 3, 19] as [UInt8]), (UInt8(ACCEL_ALG_LZ4.rawValue), [0, 3, 12])] {
      for level in levels where size < 1 << 20 || level < 12 {
        var produced: UInt32 = 0
        var consumed: UInt32 = 0
        let st = accel_engine_compress(ctx, alg, level, input, UInt32(size), &out, UInt32(cap), &produced, &consumed)
        #expect(st == 0, "alg \(alg) level \(level) size \(size)")
        var made: UInt32 = 0
        let st2 = accel_engine_decompress(ctx, alg, out, produced, &back, UInt32(back.count), &made, &consumed)
        #expect(st2 == 0 && made == UInt32(size) && Array(back.prefix(size)) == input, "alg \(alg) level \(level)")
        #expect(consumed == produced)
      }
    }
  }

  @Test(arguments: [ACCEL_ALG_ZSTD, ACCEL_ALG_LZ4])
  func zstdAndLz4ReportTheRightFailure(algorithm: accel_algorithm) throws {
    let ctx = try #require(accel_engine_create())
    defer { accel_engine_destroy(ctx) }
    let alg = UInt8(algorithm.rawValue)
    let input = [UInt8](repeating: 65, count: 100_000) + Self.random(1000, seed: 3)
    var packed = [UInt8](repeating: 0, count: Int(accel_compress_bound(UInt64(input.count))))
    var n: UInt32 = 0
    var used: UInt32 = 0
    #expect(accel_engine_compress(ctx, alg, 3, input, UInt32(input.count), &packed, UInt32(packed.count), &n, &used) == 0)
    let stream = Array(packed.prefix(Int(n)))
    var out = [UInt8](repeating: 0, count: 300_000)
    func run(_ s: [UInt8], cap: Int = 300_000) -> UInt16 {
      var p: UInt32 = 0
      var c: UInt32 = 0
      return accel_engine_decompress(ctx, alg, s, UInt32(s.count), &out, UInt32(cap), &p, &c)
    }
    #expect(run(stream) == UInt16(ACCEL_STATUS_OK.rawValue))
    #expect(Array(out.prefix(input.count)) == input)
    #expect(run(stream, cap: input.count - 1) == UInt16(ACCEL_STATUS_OUTPUT_OVERFLOW.rawValue), "bomb cap")
    #expect(run(stream, cap: input.count) == UInt16(ACCEL_STATUS_OK.rawValue), "exact fit")
    #expect(run(Array(stream.dropLast(7))) == UInt16(ACCEL_STATUS_TRUNCATED_INPUT.rawValue), "cut short")
    #expect(run([]) == UInt16(ACCEL_STATUS_TRUNCATED_INPUT.rawValue), "empty")
    var badChecksum = stream
    badChecksum[badChecksum.count - 1] ^= 0xFF
    #expect(run(badChecksum) == UInt16(ACCEL_STATUS_CHECKSUM_MISMATCH.rawValue))
    #expect(run(stream + stream) == UInt16(ACCEL_STATUS_OK.rawValue), "concatenated frames")
    #expect(run(stream + [1, 2, 3, 4, 5, 6, 7, 8]) != UInt16(ACCEL_STATUS_OK.rawValue), "trailing garbage")
    #expect(run(Self.random(5000, seed: 9)) == UInt16(ACCEL_STATUS_CORRUPT_INPUT.rawValue), "not a frame")
    // The engine stays usable after every failure.
    #expect(run(stream) == UInt16(ACCEL_STATUS_OK.rawValue))
  }

  /// Found by fuzz/api: after a truncated LZ4 frame that declared its content
  /// size, a valid empty frame that does not declare one failed on the same
  /// engine ("corrupt input"), across tenants: liblz4's reset kept the old
  /// frame's remaining size. A failed frame now costs the engine a fresh context.
  @Test func aFailedLZ4FrameLeavesNothingForTheNextJob() throws {
    let ctx = try #require(accel_engine_create())
    defer { accel_engine_destroy(ctx) }
    let lz4 = UInt8(ACCEL_ALG_LZ4.rawValue)
    let truncatedWithSize: [UInt8] = [
      4, 34, 77, 24, 104, 64, 224, 46, 0, 0, 0, 0, 0, 0, 37, 68, 0, 0, 0, 207, 104, 101, 108, 108, 111, 32, 119, 111,
      114, 108, 100, 32, 12, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
    ]
    let emptyFrame: [UInt8] = [4, 34, 77, 24, 96, 64, 130, 0, 0, 0, 0]
    func run(_ s: [UInt8]) -> UInt16 {
      var out = [UInt8](repeating: 0, count: 4096)
      var p: UInt32 = 0
      var c: UInt32 = 0
      return accel_engine_decompress(ctx, lz4, s, UInt32(s.count), &out, UInt32(out.count), &p, &c)
    }
    #expect(run(emptyFrame) == UInt16(ACCEL_STATUS_OK.rawValue))
    for _ in 0..<3 {
      #expect(run(truncatedWithSize) != UInt16(ACCEL_STATUS_OK.rawValue))
      #expect(run(emptyFrame) == UInt16(ACCEL_STATUS_OK.rawValue), "the failed frame leaked into the next job")
    }
  }
}
