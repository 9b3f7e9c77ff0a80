/// Estimates a job's device time from its size, learning ns-per-byte online.
///
/// Each job class (operation, algorithm, level band) keeps an exponentially
/// weighted moving average of `(engine ns - fixed overhead) / bytes`, fed by
/// the engine time every completion reports. Estimates start from priors close
/// to the engines' speed on this machine kind and converge within a few dozen
/// jobs; the fair scheduler's charge correction absorbs what remains.
public struct CostModel: Sendable {
  public struct JobClass: Hashable, Sendable {
    public var operation: UInt8
    public var algorithm: UInt8
    /// Compression level band (0, 1-3, 4-9 map to 0, 1, 2); 0 for everything else.
    public var band: UInt8
    /// Input size band (under 16 KiB, under 256 KiB, larger: 0, 1, 2). Per-job
    /// overheads (cipher setup, table resets) dominate small jobs, so one rate
    /// learned from small jobs would overestimate large ones severalfold and
    /// starve the in-flight budget; each size band learns its own rate.
    public var sizeBand: UInt8
    public init(operation: UInt8, algorithm: UInt8, band: UInt8, sizeBand: UInt8 = 0) {
      self.operation = operation
      self.algorithm = algorithm
      self.band = band
      self.sizeBand = sizeBand
    }

    /// The size band for `bytes` of input.
    public static func sizeBand(_ bytes: Int) -> UInt8 { bytes < 16 << 10 ? 0 : bytes < 256 << 10 ? 1 : 2 }
  }

  /// Fixed per-job device cost (descriptor fetch, engine setup), in ns.
  public var fixedNanoseconds: Double = 2_000
  /// Weight of each new observation in the moving average.
  public var smoothing: Double = 0.2
  private var nanosecondsPerByte: [JobClass: Double] = [:]
  private let prior: @Sendable (JobClass) -> Double

  /// - Parameter prior: ns per byte to assume for a class never observed.
  public init(prior: @escaping @Sendable (JobClass) -> Double = { _ in 2.0 }) {
    self.prior = prior
  }

  public func rate(_ c: JobClass) -> Double { nanosecondsPerByte[c] ?? prior(c) }

  /// Estimated device time in ns for `bytes` of input.
  public func estimate(_ c: JobClass, bytes: Int) -> UInt64 {
    UInt64(fixedNanoseconds + Double(max(0, bytes)) * rate(c))
  }

  /// Learns from a completed job. Tiny jobs say little about throughput and are skipped.
  public mutating func observe(_ c: JobClass, bytes: Int, engineNanoseconds: UInt64) {
    guard bytes >= 4096 else { return }
    let sample = max(0, Double(engineNanoseconds) - fixedNanoseconds) / Double(bytes)
    nanosecondsPerByte[c] = rate(c) + smoothing * (sample - rate(c))
  }
}
