/// The status a call ends with: a gRPC status code, its message, and the
/// trailers that go with it (retry hints). Every failure becomes one in
/// `StatusMapping`, and the edge sends it as the call's status.
struct CallStatus: Error, Sendable {
  /// gRPC's status codes (their numbers are the wire values).
  enum Code: Int, Sendable, CaseIterable {
    case ok = 0, cancelled, unknown, invalidArgument, deadlineExceeded, notFound, alreadyExists, permissionDenied
    case resourceExhausted, failedPrecondition, aborted, outOfRange, unimplemented, internalError, unavailable
    case dataLoss, unauthenticated

    /// The canonical upper-case name, as gRPC's own status table spells it.
    var name: String {
      switch self {
      case .ok: "OK"
      case .cancelled: "CANCELLED"
      case .unknown: "UNKNOWN"
      case .invalidArgument: "INVALID_ARGUMENT"
      case .deadlineExceeded: "DEADLINE_EXCEEDED"
      case .notFound: "NOT_FOUND"
      case .alreadyExists: "ALREADY_EXISTS"
      case .permissionDenied: "PERMISSION_DENIED"
      case .resourceExhausted: "RESOURCE_EXHAUSTED"
      case .failedPrecondition: "FAILED_PRECONDITION"
      case .aborted: "ABORTED"
      case .outOfRange: "OUT_OF_RANGE"
      case .unimplemented: "UNIMPLEMENTED"
      case .internalError: "INTERNAL"
      case .unavailable: "UNAVAILABLE"
      case .dataLoss: "DATA_LOSS"
      case .unauthenticated: "UNAUTHENTICATED"
      }
    }
  }

  let code: Code
  let message: String
  /// Sent as trailing metadata beside the status (for example `retry-after-ms`).
  var trailers: [(key: String, value: String)] = []

  init(code: Code, message: String, trailers: [(key: String, value: String)] = []) {
    self.code = code
    self.message = message
    self.trailers = trailers
  }

  /// The value of trailer `key`, if the status carries it.
  func trailer(_ key: String) -> String? { trailers.first { $0.key == key }?.value }
}
