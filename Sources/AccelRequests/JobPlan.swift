package import AccelDispatcher
package import AccelMessages

/// The operation a job performs, as statuses, metrics and audits name it.
package enum JobOperation: String, Sendable {
  case compress, decompress, encrypt, decrypt, digest

  /// The operation as the audit log names it (a keyed digest is an HMAC).
  package var auditName: String { self == .digest ? "hmac" : rawValue }
}

/// A request checked and turned into a job: what the edge runs, and what it
/// needs to name a failure and to answer.
package struct JobPlan: Sendable {
  package var job: JobRequest
  package var operation: JobOperation
  /// The output bound an overflow status names.
  package var outputLimit: Int
  /// The engine (or chain of engines) the response's stats name.
  package var engine: String

  /// The response's statistics for the job's result.
  package func stats(for result: JobResult) -> Accelgate_V1_JobStats {
    Accelgate_V1_JobStats(result.stats, engine: engine)
  }
}

extension JobPlan {
  /// A Compress job's response: the output and the stats.
  package func compressResponse(_ result: JobResult) -> Accelgate_V1_CompressResponse {
    var out = Accelgate_V1_CompressResponse()
    out.data = result.output
    out.stats = stats(for: result)
    return out
  }

  /// A Decompress job's response: the output and the stats.
  package func decompressResponse(_ result: JobResult) -> Accelgate_V1_DecompressResponse {
    var out = Accelgate_V1_DecompressResponse()
    out.data = result.output
    out.stats = stats(for: result)
    return out
  }
}
