internal import AccelABI
internal import AccelDispatcher
internal import AccelRequests
internal import GRPCCore

/// A refused request ends its call with the status `StatusMapping` gives it,
/// wherever in a handler it is thrown.
extension RequestError: RPCErrorConvertible {
  var rpcErrorCode: RPCError.Code { StatusMapping.rpcError(self).code }
  var rpcErrorMessage: String { StatusMapping.rpcError(self).message }
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

  static func rpcError(_ error: LocalLaneError) -> RPCError {
    switch error {
    case .notFound(let m): RPCError(code: .notFound, message: m)
    case .permissionDenied(let m): RPCError(code: .permissionDenied, message: m)
    case .invalidArgument(let m), .refused(let m): RPCError(code: .invalidArgument, message: m)
    case .outOfRange(let m): RPCError(code: .resourceExhausted, message: m)
    case .failedPrecondition(let m): RPCError(code: .failedPrecondition, message: m)
    case .unavailable(let m): RPCError(code: .unavailable, message: m)
    case .quota: RPCError(code: .resourceExhausted, message: error.message)
    }
  }

  /// Any error a handler meets as the status it ends the call with: statuses
  /// and typed refusals as mapped here; anything else is INTERNAL.
  static func rpcError(any error: any Error) -> RPCError {
    switch error {
    case let e as RPCError: e
    case let e as RequestError: rpcError(e)
    case let e as KeyError: rpcError(e)
    case let e as LocalLaneError: rpcError(e)
    default: RPCError(code: .internalError, message: "internal error")
    }
  }
}

/// The one place where failures become gRPC statuses. The table is in docs/STATUS.md.
///
/// Retry hints (`retry-after-ms` metadata) go only on admission rejections.
enum StatusMapping {
  static func rpcError(_ error: RequestError) -> RPCError {
    switch error {
    case .invalidArgument(let why): RPCError(code: .invalidArgument, message: why)
    case .failedPrecondition(let why): RPCError(code: .failedPrecondition, message: why)
    case .payloadTooLarge(let size, let limit):
      RPCError(code: .resourceExhausted, message: "payload of \(size) bytes exceeds the \(limit)-byte limit")
    case .key(let e): rpcError(e)
    case .internalFailure(let why): RPCError(code: .internalError, message: why)
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
