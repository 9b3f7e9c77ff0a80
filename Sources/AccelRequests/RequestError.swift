/// Why a request was refused before it became a job.
///
/// Every edge maps these to statuses in one place (AccelService's
/// `StatusMapping`; the table is docs/STATUS.md), so the gRPC front end and
/// any other front end refuse the same request with the same status.
package enum RequestError: Error, Equatable, Sendable {
  /// INVALID_ARGUMENT: the request itself is wrong.
  case invalidArgument(String)
  /// FAILED_PRECONDITION: well formed, but this server is not set up to serve it.
  case failedPrecondition(String)
  /// RESOURCE_EXHAUSTED: a payload, AAD or output over a limit.
  case payloadTooLarge(size: Int, limit: Int)
  /// A named key that cannot be used (not found, another tenant's, retired, out of nonces).
  case key(KeyError)
  /// The gateway could not do its own part (no randomness): INTERNAL.
  case internalFailure(String)
}
