internal import AccelDispatcher
internal import AccelDriver
internal import AccelRequests
internal import AccelMessages
internal import CAccelCrypto
internal import FoundationEssentials
internal import SwiftProtobuf

// The network lane (docs/NETWORK_LANE.md): Compress, Decompress, Encrypt and
// Decrypt stage their payload field straight from the C core's message bytes
// into a buffer in a device queue's pool, and their result is sent from the
// pool in place: one copy in, none out, instead of protobuf's `Data` and the
// dispatcher's copy each way.

/// Where the network lane stages payloads, and where it counts refusals.
struct NetworkLane: Sendable {
  let dispatcher: Dispatcher
  var metrics: GatewayMetrics? = nil

  // Payload field numbers, from proto/accelgate/v1/accelerator.proto (checked by NetworkLaneTests).
  static let compressData: UInt32 = 3
  static let decompressData: UInt32 = 2
  static let encryptPlaintext: UInt32 = 5
  static let decryptCiphertext: UInt32 = 5
  static let responsePayload: UInt32 = 1

  /// Decodes a request from the transport's bytes, in as many slices as the
  /// transport holds it. Its payload field is staged in a device pool first
  /// (the one copy in, straight from the slices) and the other fields decoded;
  /// when nothing is staged (see `stage`) the whole message is decoded the
  /// ordinary way, from `whole()` (the message in one buffer). A request that
  /// does not decode is refused as SwiftProtobuf refuses it, and its staged
  /// buffer is given back.
  ///
  /// `wipe` zeroes the copy of the other fields after decoding when the
  /// payload is plaintext (`sensitive`) or the fields may hold a raw key
  /// (`carriesKey`; issue 17, finding 21).
  func decode<Message: SwiftProtobuf.Message & Sendable>(
    _ message: SlicedBytes, whole: () -> UnsafeRawBufferPointer, field: UInt32, maxPayload: Int, sensitive: Bool,
    carriesKey: Bool, tenant: String,
    wipe: (UnsafeMutableRawBufferPointer) -> Void = { accel_secure_zero($0.baseAddress, $0.count) }
  ) throws -> LaneRequest<Message> {
    guard let (staged, rest) = stage(message, field: field, maxPayload: maxPayload, sensitive: sensitive, tenant: tenant)
    else { return LaneRequest(message: try Self.decodeWhole(whole()), staged: nil) }
    var others = rest
    defer { if sensitive || carriesKey { others.withUnsafeMutableBytes { wipe($0) } } }
    do { return LaneRequest(message: try Message(serializedBytes: others), staged: staged) } catch {
      staged.release()
      throw error
    }
  }

  /// Decodes a whole message straight from the transport's bytes (decoding copies what it keeps).
  static func decodeWhole<M: SwiftProtobuf.Message>(_ raw: UnsafeRawBufferPointer) throws -> M {
    guard let base = raw.baseAddress, raw.count > 0 else { return M() }
    return try M(serializedBytes: Data(bytesNoCopy: UnsafeMutableRawPointer(mutating: base), count: raw.count, deallocator: .none))
  }

  /// Stages the payload field (`field`, the last occurrence: protobuf's rule
  /// for a repeated singular field) in a pool and copies it there; returns the
  /// buffer and the message's other fields, concatenated (a valid message
  /// without the payload). Nil when nothing should be staged: malformed
  /// framing, no or an empty payload, the payload field with the wrong wire
  /// type, or a refusal (tenant share, pool full, too large). The caller then
  /// decodes the whole message the ordinary way.
  func stage(
    _ raw: SlicedBytes, field: UInt32, maxPayload: Int, sensitive: Bool, tenant: String
  ) -> (StagedInput, [UInt8])? {
    guard let fields = ProtoWire.scan(raw) else { return nil }
    var payload: ProtoWire.Field?
    var payloadBytes = 0
    for f in fields where f.number == field {
      guard f.wireType == ProtoWire.lengthDelimited else { return nil }
      payload = f
      payloadBytes += f.range.count
    }
    guard let payload, !payload.value.isEmpty else { return nil }
    let refusal: StagingRefusal
    if payload.value.count > maxPayload {
      refusal = .tooLarge
    } else {
      switch dispatcher.stageInput(length: payload.value.count, tenant: tenant, sensitive: sensitive) {
      case .success(let staged):
        // The one copy in: transport bytes → device pool.
        raw.copy(payload.value, to: staged.buffer)
        var rest: [UInt8] = []
        rest.reserveCapacity(raw.count - payloadBytes)
        for f in fields where f.number != field { raw.append(f.range, to: &rest) }
        return (staged, rest)
      case .failure(let r):
        refusal = r
      }
    }
    if refusal != .off { metrics?.recordStagingRefusal(tenant: tenant, reason: refusal.rawValue) }
    return nil
  }
}

/// A request as the network lane decodes it: the message without its payload
/// when `staged` holds the payload, else the whole message.
struct LaneRequest<Message: SwiftProtobuf.Message & Sendable>: Sendable {
  var message: Message
  var staged: StagedInput?
}

/// A response as the edge sends it: `message` without its payload field when
/// `pooled` holds the result (sent after `prefix`), else the whole message.
struct LaneResponse<Message: SwiftProtobuf.Message & Sendable>: Sendable {
  var message: Message
  var pooled: PooledOutput? = nil
  /// Bytes written before the pooled output in the payload field (a named key's envelope header and nonce).
  var prefix = Data()
}

extension AcceleratorService {
  /// Counts one finished call's payload copies (`accelgate_payload_copies_total`).
  ///
  /// In: the payload field is copied once out of the transport's bytes, by
  /// SwiftProtobuf into `Data` or by the lane into the pool, plus whatever the
  /// dispatcher copied into the pool (`inputCopies`). Out: what the dispatcher
  /// copied out of the pool (`outputCopies`), `extraOut` copies made here (a
  /// named key's envelope), plus the one serialization into the response
  /// bytes. Local-lane calls (regions) are not counted: their payloads never
  /// cross the network.
  func recordCopies(
    tenant: String, operation: String, lane: PayloadLane, spans: LocalSpans, result: JobResult, extraOut: UInt32 = 0,
    sentInPlace: Bool = false
  ) {
    guard let metrics, !spans.isLocal else { return }
    let s = result.stats
    let pooledIn = lane.staged != nil && s.inputCopies == 0
    metrics.recordPayloadCopies(
      tenant: tenant, operation: operation, direction: "in", path: pooledIn ? "pooled" : "copied",
      copies: 1 + s.inputCopies, bytes: Int(s.inputBytes))
    metrics.recordPayloadCopies(
      tenant: tenant, operation: operation, direction: "out", path: result.pooledOutput != nil ? "pooled" : "copied",
      copies: s.outputCopies + extraOut + (sentInPlace ? 0 : 1), bytes: Int(s.outputBytes))
  }
}
