internal import CAccelGRPC
internal import Glibc

/// C strings for metadata, alive for the length of one call into the core.
enum CoreStrings {
  static func withKeyValues<R>(_ pairs: [(String, String)], _ body: (UnsafeBufferPointer<accel_grpc_kv>) -> R) -> R {
    guard !pairs.isEmpty else { return body(UnsafeBufferPointer(start: nil, count: 0)) }
    var strings: [UnsafeMutablePointer<CChar>] = []
    defer { strings.forEach { free($0) } }
    var kvs: [accel_grpc_kv] = []
    for (k, v) in pairs {
      guard let ck = strdup(k), let cv = strdup(v) else { continue }
      strings += [ck, cv]
      kvs.append(accel_grpc_kv(key: ck, value: cv))
    }
    return kvs.withUnsafeBufferPointer(body)
  }
}
