/// A call's request id, returned in its `x-request-id` header and trailer and
/// written in its access-log line.
enum RequestID {
  /// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
  /// else a caller's `x-request-id` of 1–64 safe characters, else 16 random hex digits.
  static func from(traceparent: String?, requestID: String?) -> String {
    if let tp = traceparent {
      let parts = tp.split(separator: "-")
      if parts.count == 4, parts[0].count == 2, parts[1].count == 32, parts[2].count == 16, parts[3].count == 2,
        parts.allSatisfy({ $0.allSatisfy(\.isHexDigit) }), parts[1] != String(repeating: "0", count: 32), parts[0] != "ff"
      {
        return parts[1].lowercased()
      }
    }
    if let given = requestID, (1...64).contains(given.count),
      given.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.".contains($0)) })
    {
      return given
    }
    let hex = String(UInt64.random(in: 0...UInt64.max), radix: 16)
    return String(repeating: "0", count: 16 - hex.count) + hex
  }
}
