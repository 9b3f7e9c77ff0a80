internal import AccelABI
internal import AccelDispatcher
internal import AccelRequests
internal import AccelMessages
internal import SwiftProtobuf

/// The pipelined `Submit` stream.
///
/// One reader pulls requests only while the tenant has room in its queue (so a
/// full queue stops the reading and HTTP/2 flow control pushes back on the
/// client); each request runs as its own job; a single writer sends results in
/// completion order. Per-stream outstanding jobs are bounded too, so one
/// stream's memory stays bounded whatever the client sends.
extension AcceleratorService {
  /// Most jobs one stream may have outstanding (queued or on the device).
  static let maxOutstandingPerStream = 64

  /// One Submit stream.
  func submit(
    _ io: StreamIO<Accelgate_V1_SubmitRequest, Accelgate_V1_SubmitResponse>, tenant: String, deadline: CallDeadline
  ) async throws {
      let (results, sink) = AsyncStream<Accelgate_V1_SubmitResponse>.makeStream()
      let work = Task {
        try await withThrowingTaskGroup(of: Void.self) { group in
          group.addTask {
            defer { sink.finish() }
            try await withThrowingTaskGroup(of: Void.self) { jobs in
              var outstanding = 0
              while true {
                if outstanding >= Self.maxOutstandingPerStream {
                  try await jobs.next()
                  outstanding -= 1
                }
                await dispatcher.waitForRoom(tenant: tenant)
                try Task.checkCancellation()
                guard let item = try await io.next() else { break }
                outstanding += 1
                jobs.addTask { sink.yield(await runItem(item, tenant: tenant, deadline: deadline)) }
              }
              try await jobs.waitForAll()
            }
          }
          for await r in results { try await io.write(r) }
          try await group.waitForAll()
        }
      }
      do {
        try await withTaskCancellationHandler { try await work.value } onCancel: { work.cancel() }
      } catch let e as CallStatus {
        throw e
      } catch {
        // Cancelled (the transport ends a call at its deadline): say why, never
        // UNKNOWN and never OK with jobs left unanswered (found by fuzz/api).
        throw Self.streamEnded(deadline)
      }
      // Read to the end, but the deadline passed meanwhile: jobs it cut short
      // were not all answered, so the call did not complete.
      if deadline.hasPassed || Task.isCancelled { throw Self.streamEnded(deadline) }
  }

  /// Runs one stream item. Admission rejections wait for room and retry, because
  /// the stream's contract is back-pressure, not failure.
  private func runItem(_ item: Accelgate_V1_SubmitRequest, tenant: String, deadline: CallDeadline) async
    -> Accelgate_V1_SubmitResponse
  {
    var out = Accelgate_V1_SubmitResponse()
    out.id = item.id
    do {
      try JobTranslator.checkSubmitItem(item)
      try await retryingAdmission(tenant: tenant, deadline: deadline) {
        switch item.job {
        case .compress(let r):
          let plan = try translator.compress(r, tenant: tenant)
          let result = try await run(plan, deadline: deadline)
          out.compress = plan.compressResponse(result)
        case .decompress(let r):
          let plan = try translator.decompress(r, tenant: tenant)
          let result = try await run(plan, deadline: deadline)
          out.decompress = plan.decompressResponse(result)
        case .encrypt(let r): out.encrypt = try await encrypt(r, tenant: tenant, deadline: deadline)
        case .decrypt(let r): out.decrypt = try await decrypt(r, tenant: tenant, deadline: deadline)
        case .digest(let r): out.digest = try await digest(r, tenant: tenant, deadline: deadline)
        case nil: break  // refused by checkSubmitItem
        }
      }
    } catch {
      let e = StatusMapping.callStatus(any: error)
      out.code = Int32(e.code.rawValue)
      out.message = e.message
      out.retryAfterMs = e.trailer("retry-after-ms").flatMap { UInt64($0) } ?? 0
    }
    return out
  }

  /// The status of a Submit stream cut short by its deadline or a cancellation.
  static func streamEnded(_ deadline: CallDeadline) -> CallStatus {
    deadline.hasPassed
      ? CallStatus(code: .deadlineExceeded, message: "deadline exceeded before the stream completed")
      : CallStatus(code: .cancelled, message: "call cancelled")
  }

  /// Runs `body` again while admission turns it away with a retry hint.
  private func retryingAdmission(tenant: String, deadline: CallDeadline, _ body: () async throws -> Void) async throws {
    while true {
      do {
        return try await body()
      } catch let e as CallStatus where e.code == .resourceExhausted {
        guard let hint = e.trailer("retry-after-ms").flatMap({ Int64($0) }),
          !Task.isCancelled, !deadline.hasPassed
        else { throw e }
        // Queue full: wait for room. Rate-limited: wait out the hint the bucket gave.
        await dispatcher.waitForRoom(tenant: tenant)
        try await Task.sleep(for: .milliseconds(min(max(hint, 1), 1000)))
      }
    }
  }
}
