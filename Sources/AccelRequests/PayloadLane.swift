package import AccelDispatcher
package import AccelDriver
package import FoundationEssentials

/// How a unary job call's payload arrived and how its result should leave
/// (docs/NETWORK_LANE.md).
package struct PayloadLane: Sendable {
  /// The payload, already in a queue's pool (network lane); nil: it is in the message.
  package var staged: StagedInput? = nil
  /// Leave the result in the pool, for the edge to send from there.
  package var poolOutput = false

  package init(staged: StagedInput? = nil, poolOutput: Bool = false) {
    self.staged = staged
    self.poolOutput = poolOutput
  }

  /// The generated protobuf coding: payload and result travel as `Data`.
  package static let copied = PayloadLane()
  package static func pooled(_ staged: StagedInput?) -> PayloadLane { PayloadLane(staged: staged, poolOutput: true) }

  /// The payload's length: staged, or the message's own field.
  package func payloadCount(inline: Data) -> Int { staged?.length ?? inline.count }

  /// Points the job at the staged payload (after `skip` bytes) and asks for the pooled result.
  package func apply(to job: inout JobRequest, skip: Int = 0) {
    if let staged { job.input = .staged(staged, skip: skip) }
    if poolOutput { job.output = .pooled }
  }
}

/// The lengths of a request's local-lane spans (client memory), which is all
/// the translator needs of them: the local lane binds the spans and points
/// the finished job at them.
package struct SpanLengths: Sendable, Equatable {
  /// Bytes of the input span; nil when the input is in the message.
  package var input: Int? = nil
  /// Bytes of the output span; nil when the result goes in the response.
  package var output: Int? = nil

  package init(input: Int? = nil, output: Int? = nil) {
    self.input = input
    self.output = output
  }

  package static let none = SpanLengths()
  package var isLocal: Bool { input != nil || output != nil }
}
