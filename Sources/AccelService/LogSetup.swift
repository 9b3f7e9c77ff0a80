internal import Foundation
internal import Glibc
public import Logging
internal import Synchronization

/// Process-wide logging: swift-log with either the standard text handler or
/// JSON lines (one object per event, for log shippers). Call once, at start.
public enum LogSetup {
  /// Bootstraps swift-log and returns the gateway's logger.
  public static func bootstrap(level: String, format: String, label: String = "accelgate") -> Logger {
    let lvl = Logger.Level(rawValue: level) ?? .info
    if format == "json" {
      LoggingSystem.bootstrap { JSONLinesLogHandler(label: $0, level: lvl) }
    } else {
      LoggingSystem.bootstrap { var h = StreamLogHandler.standardError(label: $0); h.logLevel = lvl; return h }
    }
    var logger = Logger(label: label)
    logger.logLevel = lvl
    return logger
  }
}

/// Writes each event as one JSON object on standard error:
/// `{"ts":"…","level":"info","label":"accelgate","msg":"…", …metadata}`.
/// Metadata keys become top-level fields (nested values are flattened to strings).
public struct JSONLinesLogHandler: LogHandler {
  public var metadata: Logger.Metadata = [:]
  public var metadataProvider: Logger.MetadataProvider?
  public var logLevel: Logger.Level
  let label: String
  private static let lock = Mutex<Void>(())

  public init(label: String, level: Logger.Level = .info) {
    self.label = label
    self.logLevel = level
  }

  public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
    get { metadata[key] }
    set { metadata[key] = newValue }
  }

  public func log(event: LogEvent) {
    var fields: [String: String] = [:]
    for (k, v) in metadata { fields[k] = "\(v)" }
    for (k, v) in metadataProvider?.get() ?? [:] { fields[k] = "\(v)" }
    for (k, v) in event.metadata ?? [:] { fields[k] = "\(v)" }
    if let error = event.error { fields["error"] = "\(error)" }
    var line = "{\"ts\":\(Self.quote(Self.timestamp())),\"level\":\(Self.quote(event.level.rawValue)),"
    line += "\"label\":\(Self.quote(label)),\"msg\":\(Self.quote(event.message.description))"
    for k in fields.keys.sorted() where !["ts", "level", "label", "msg"].contains(k) {
      line += ",\(Self.quote(k)):\(Self.quote(fields[k]!))"
    }
    line += "}\n"
    Self.lock.withLock { _ in FileHandle.standardError.write(Data(line.utf8)) }
  }

  static func timestamp() -> String {
    let now = Date().timeIntervalSince1970
    var secs = time_t(now.rounded(.down))
    let micros = Int((now - now.rounded(.down)) * 1e6)
    var tmv = tm()
    gmtime_r(&secs, &tmv)
    return String(
      format: "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tmv.tm_year + 1900, tmv.tm_mon + 1, tmv.tm_mday, tmv.tm_hour,
      tmv.tm_min, tmv.tm_sec, micros)
  }

  /// A JSON string literal.
  static func quote(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
      switch u {
      case "\"": out += "\\\""
      case "\\": out += "\\\\"
      case "\n": out += "\\n"
      case "\r": out += "\\r"
      case "\t": out += "\\t"
      case _ where u.value < 0x20: out += String(format: "\\u%04x", u.value)
      default: out.unicodeScalars.append(u)
      }
    }
    return out + "\""
  }
}
