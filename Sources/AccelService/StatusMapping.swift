internal import AccelABI
internal import AccelDispatcher
internal import AccelRequests
extension StatusMapping {
  static func callStatus(_ error: KeyError) -> CallStatus {
    switch error {
    case .notFound(let name): CallStatus(code: .notFound, message: "no key named '\(name)'")
    case .otherTenant(let name): CallStatus(code: .permissionDenied, message: "key '\(name)' belongs to another tenant")
    case .noUsableVersion(let name): CallStatus(code: .failedPrecondition, message: "key '\(name)' has no enabled version")
    case .versionRetired(let name, let v):
      CallStatus(code: .failedPrecondition, message: "key '\(name)' version \(v) is retired and cannot decrypt")
    case .versionUnknown(let name, let v): CallStatus(code: .failedPrecondition, message: "key '\(name)' has no version \(v)")
    case .exhausted(let name, let v):
      CallStatus(code: .failedPrecondition, message: "key '\(name)' version \(v) has used its nonce budget; rotate the key")
    case .noKeyring: CallStatus(code: .failedPrecondition, message: "the server has no keyring; use a raw key")
    case .ledgerUnavailable(let why): CallStatus(code: .unavailable, message: "cannot record the key's nonce use (\(why)); not encrypting")
    }
  }

  static func callStatus(_ error: LocalLaneError) -> CallStatus {
    switch error {
    case .notFound(let m): CallStatus(code: .notFound, message: m)
    case .permissionDenied(let m): CallStatus(code: .permissionDenied, message: m)
    case .invalidArgument(let m), .refused(let m): CallStatus(code: .invalidArgument, message: m)
    case .outOfRange(let m): CallStatus(code: .resourceExhausted, message: m)
    case .failedPrecondition(let m): CallStatus(code: .failedPrecondition, message: m)
    case .unavailable(let m): CallStatus(code: .unavailable, message: m)
    case .quota: CallStatus(code: .resourceExhausted, message: error.message)
    }
  }

  /// Any error a handler meets as the status it ends the call with: statuses
  /// and typed refusals as mapped here; anything else is INTERNAL.
  static func callStatus(any error: any Error) -> CallStatus {
    switch error {
    case let e as CallStatus: e
    case let e as RequestError: callStatus(e)
    case let e as KeyError: callStatus(e)
    case let e as LocalLaneError: callStatus(e)
    default: CallStatus(code: .internalError, message: "internal error")
    }
  }
}

/// The one place where failures become gRPC statuses. The table is in docs/STATUS.md.
///
/// Retry hints (`retry-after-ms` metadata) go only on admission rejections.
enum StatusMapping {
  static func callStatus(_ error: RequestError) -> CallStatus {
    switch error {
    case .invalidArgument(let why): CallStatus(code: .invalidArgument, message: why)
    case .failedPrecondition(let why): CallStatus(code: .failedPrecondition, message: why)
    case .payloadTooLarge(let size, let limit):
      CallStatus(code: .resourceExhausted, message: "payload of \(size) bytes exceeds the \(limit)-byte limit")
    case .key(let e): callStatus(e)
    case .internalFailure(let why): CallStatus(code: .internalError, message: why)
    }
  }

  static func callStatus(_ error: JobError, operation: String, outputLimit: Int) -> CallStatus {
    switch error {
    case .rejected(let reason, let retryAfter):
      return CallStatus(
        code: .resourceExhausted, message: "rejected: \(reason.rawValue); retry in \(retryAfter) ms",
        trailers: [("retry-after-ms", String(retryAfter)), ("rejection-reason", reason.rawValue)])
    case .payloadOverTenantLimit(let size, let limit):
      return CallStatus(code: .resourceExhausted, message: "payload of \(size) bytes exceeds the tenant's \(limit)-byte limit")
    case .tooLarge(let needed, let limit):
      return CallStatus(code: .resourceExhausted, message: "job needs \(needed) bytes of device memory; the device holds at most \(limit)")
    case .deadlineExceeded:
      return CallStatus(code: .deadlineExceeded, message: "deadline exceeded before the job completed")
    case .cancelled:
      return CallStatus(code: .cancelled, message: "call cancelled")
    case .shuttingDown:
      return CallStatus(code: .unavailable, message: "server is shutting down")
    case .unavailable(let why):
      return CallStatus(code: .unavailable, message: why)
    case .device(let status):
      switch status {
      case .corruptInput: return CallStatus(code: .invalidArgument, message: "\(operation): corrupt input")
      case .truncatedInput: return CallStatus(code: .invalidArgument, message: "\(operation): truncated input")
      case .checksumMismatch: return CallStatus(code: .dataLoss, message: "\(operation): checksum mismatch")
      case .outputOverflow:
        return CallStatus(code: .resourceExhausted, message: "\(operation): output exceeds the limit of \(outputLimit) bytes")
      case .unsupported: return CallStatus(code: .invalidArgument, message: "\(operation): unsupported by the device")
      case .authFailed: return CallStatus(code: .invalidArgument, message: "authentication failed")
      case .badKey: return CallStatus(code: .invalidArgument, message: "\(operation): key is not valid for the algorithm")
      case .badParams: return CallStatus(code: .invalidArgument, message: "\(operation): invalid parameters")
      case .invalidDescriptor, .engineError, .queueStopped, .deviceFault, .verifyFailed, .moreOutput, .ok:
        return CallStatus(code: .internalError, message: "\(operation): device error (\(status))")
      }
    }
  }
}
