internal import AccelABI
internal import AccelDispatcher
internal import GRPCCore

/// Errors the service raises itself, before a job reaches the dispatcher.
enum RequestError: Error {
  case invalidArgument(String)
  case payloadTooLarge(size: Int, limit: Int)
}

extension StatusMapping {
  static func rpcError(_ error: KeyError) -> RPCError {
    switch error {
    case .notFound(let name): RPCError(code: .notFound, message: "no key named '\(name)'")
    case .otherTenant(let name): RPCError(code: .permissionDenied, message: "key '\(name)' belongs to another tenant")
    case .noUsableVersion(let name): RPCError(code: .failedPrecondition, message: "key '\(name)' has no enabled version")
    case .versionRetired(let name, let v):
      RPCError(code: .failedPrecondition, message: "key '\(name)' version \(v) is retired and cannot decrypt")
    case .versionUnknown(let name, let v): RPCError(code: .failedPrecondition, message: "key '\(name)' has no version \(v)")
    case .exhausted(let name, let v):
      RPCError(code: .failedPrecondition, message: "key '\(name)' version \(v) has used its nonce budget; rotate the key")
    case .noKeyring: RPCError(code: .failedPrecondition, message: "the server has no keyring; use a raw key")
    case .ledgerUnavailable(let why): RPCError(code: .unavailable, message: "cannot record the key's nonce use (\(why)); not encrypting")
    }
  }
}

/// The one place where failures become gRPC statuses. The table is in docs/STATUS.md.
///
/// Retry hints (`retry-after-ms` metadata) go only on admission rejections.
enum StatusMapping {
  static func rpcError(_ error: RequestError) -> RPCError {
    switch error {
    case .invalidArgument(let why):
      return RPCError(code: .invalidArgument, message: why)
    case .payloadTooLarge(let size, let limit):
      return RPCError(code: .resourceExhausted, message: "payload of \(size) bytes exceeds the \(limit)-byte limit")
    }
  }

  static func rpcError(_ error: JobError, operation: String, outputLimit: Int) -> RPCError {
    switch error {
    case .rejected(let reason, let retryAfter):
      var md = Metadata()
      md.addString(String(retryAfter), forKey: "retry-after-ms")
      md.addString(reason.rawValue, forKey: "rejection-reason")
      return RPCError(
        code: .resourceExhausted, message: "rejected: \(reason.rawValue); retry in \(retryAfter) ms", metadata: md)
    case .payloadOverTenantLimit(let size, let limit):
      return RPCError(code: .resourceExhausted, message: "payload of \(size) bytes exceeds the tenant's \(limit)-byte limit")
    case .tooLarge(let needed, let limit):
      return RPCError(code: .resourceExhausted, message: "job needs \(needed) bytes of device memory; the device holds at most \(limit)")
    case .deadlineExceeded:
      return RPCError(code: .deadlineExceeded, message: "deadline exceeded before the job completed")
    case .cancelled:
      return RPCError(code: .cancelled, message: "call cancelled")
    case .shuttingDown:
      return RPCError(code: .unavailable, message: "server is shutting down")
    case .unavailable(let why):
      return RPCError(code: .unavailable, message: why)
    case .device(let status):
      switch status {
      case .corruptInput: return RPCError(code: .invalidArgument, message: "\(operation): corrupt input")
      case .truncatedInput: return RPCError(code: .invalidArgument, message: "\(operation): truncated input")
      case .checksumMismatch: return RPCError(code: .dataLoss, message: "\(operation): checksum mismatch")
      case .outputOverflow:
        return RPCError(code: .resourceExhausted, message: "\(operation): output exceeds the limit of \(outputLimit) bytes")
      case .unsupported: return RPCError(code: .invalidArgument, message: "\(operation): unsupported by the device")
      case .authFailed: return RPCError(code: .invalidArgument, message: "authentication failed")
      case .badKey: return RPCError(code: .invalidArgument, message: "\(operation): key is not valid for the algorithm")
      case .badParams: return RPCError(code: .invalidArgument, message: "\(operation): invalid parameters")
      case .invalidDescriptor, .engineError, .queueStopped, .deviceFault, .verifyFailed, .moreOutput, .ok:
        return RPCError(code: .internalError, message: "\(operation): device error (\(status))")
      }
    }
  }
}
