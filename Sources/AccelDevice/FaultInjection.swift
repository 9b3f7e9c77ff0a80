internal import Foundation

/// Faults the emulated device injects on purpose, so tests and drills can see
/// what callers get when hardware misbehaves. Off unless configured.
///
/// The textual form, used by `--inject-fault` and the control channel, is
/// `MODE[,every=N][,latency-ms=M][,queue=Q]`, e.g. `lost,every=3`.
public struct FaultInjection: Sendable, Equatable, CustomStringConvertible {
  public enum Mode: String, Sendable, CaseIterable {
    /// No faults.
    case none
    /// The job takes `latency` longer on the engine (slow hardware).
    case latency
    /// The job is not run; it completes with DEVICE_FAULT, a queue-class error.
    case error
    /// The job runs but its completion is never posted (a lost interrupt or CQE).
    case lost
    /// The completion is posted with impossible fields (a bus or firmware fault).
    case corruptCompletion = "corrupt-completion"
    /// The engine's output has a byte flipped before it completes (silent data
    /// corruption; compress-and-verify catches it for compression).
    case corruptOutput = "corrupt-output"
    /// The engine hangs holding the job until the fault is cleared.
    case stall
  }

  public var mode: Mode
  /// Inject on every `every`-th job the device runs (1 = every job).
  public var every: Int
  /// Extra engine time per affected job (`latency` mode).
  public var latency: Duration
  /// Affect only jobs of this queue id; nil = every queue.
  public var queue: UInt32?

  public init(mode: Mode = .none, every: Int = 1, latency: Duration = .milliseconds(100), queue: UInt32? = nil) {
    self.mode = mode
    self.every = max(1, every)
    self.latency = latency
    self.queue = queue
  }

  public static var none: Self { Self() }

  /// Parses `MODE[,every=N][,latency-ms=M][,queue=Q]`.
  public init(parsing text: String) throws(DeviceError) {
    let parts = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
    guard let first = parts.first, let mode = Mode(rawValue: first) else {
      throw .invalidConfiguration(
        "unknown fault '\(text)'; use one of \(Mode.allCases.map(\.rawValue).joined(separator: ", ")) with optional ,every=N ,latency-ms=M ,queue=Q")
    }
    self.init(mode: mode)
    for part in parts.dropFirst() {
      let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
      guard kv.count == 2, let n = UInt64(kv[1]) else { throw .invalidConfiguration("bad fault option '\(part)' in '\(text)'") }
      switch kv[0] {
      case "every" where n >= 1: every = Int(min(n, 1 << 30))
      case "latency-ms": latency = .milliseconds(Int64(min(n, 3_600_000)))
      case "queue" where n <= UInt64(UInt32.max): queue = UInt32(n)
      default: throw .invalidConfiguration("bad fault option '\(part)' in '\(text)'")
      }
    }
  }

  public var description: String {
    var s = mode.rawValue
    guard mode != .none else { return s }
    if every != 1 { s += ",every=\(every)" }
    if mode == .latency { s += ",latency-ms=\(latency.components.seconds * 1000 + latency.components.attoseconds / 1_000_000_000_000_000)" }
    if let queue { s += ",queue=\(queue)" }
    return s
  }
}
