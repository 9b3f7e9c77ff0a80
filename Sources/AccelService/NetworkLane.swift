internal import AccelDispatcher
internal import AccelDriver
internal import AccelProto
internal import AccelRequests
internal import AccelMessages
internal import CAccelCrypto
internal import FoundationEssentials
internal import GRPCCore
internal import GRPCProtobuf
internal import SwiftProtobuf

// The network lane (docs/NETWORK_LANE.md): Compress, Decompress, Encrypt and
// Decrypt get their own message deserializer and serializer. The request's
// payload field is copied from the transport's message bytes straight into a
// buffer staged in a device queue's pool, and the result is copied from the
// pool straight into the response's message bytes: one copy each way instead
// of two (protobuf's `Data` in between, and the dispatcher's copy).

/// The authenticated tenant of the call whose handler runs on this task.
///
/// `AuthInterceptor` sets it around the rest of the interceptor chain. In
/// grpc-swift-2 2.4.3 the server's message deserializer runs lazily, when the
/// handler (inside that chain, on the same task) reads the request stream
/// (`ServerRPCExecutor._processRPC` maps the inbound parts through the
/// deserializer; `ServerRequest(stream:)` iterates them), so the deserializer
/// sees it. Nil outside an authenticated call.
enum CallTenant {
  @TaskLocal static var current: String?
}

/// Just enough of the protobuf wire format to find one field's bytes without
/// decoding them: tags, varints, fixed-size and length-delimited values.
enum ProtoWire {
  /// One top-level field as it lies in the buffer.
  struct Field: Equatable {
    var number: UInt32
    var wireType: UInt8
    /// The whole field: tag, length and value.
    var range: Range<Int>
    /// The value (for a length-delimited field, without its length).
    var value: Range<Int>
  }

  static let lengthDelimited: UInt8 = 2

  /// The top-level fields of a serialized message, in order; nil when the
  /// framing is malformed (a truncated value, a varint over 10 bytes, field
  /// number 0, a length past the end) or uses groups (wire types 3 and 4).
  /// Callers then hand the whole message to SwiftProtobuf, which reports the
  /// error exactly as without the network lane (or decodes the groups).
  static func scan(_ bytes: UnsafeRawBufferPointer) -> [Field]? {
    var fields: [Field] = []
    var i = 0
    while i < bytes.count {
      let start = i
      guard let tag = varint(bytes, at: &i), tag <= UInt64(UInt32.max), tag >> 3 != 0 else { return nil }
      let wireType = UInt8(tag & 7)
      let valueStart: Int
      switch wireType {
      case 0:
        valueStart = i
        guard varint(bytes, at: &i) != nil else { return nil }
      case 1, 5:
        valueStart = i
        let size = wireType == 1 ? 8 : 4
        guard bytes.count - i >= size else { return nil }
        i += size
      case lengthDelimited:
        guard let length = varint(bytes, at: &i), length <= UInt64(bytes.count - i) else { return nil }
        valueStart = i
        i += Int(length)
      default:
        return nil
      }
      fields.append(Field(number: UInt32(tag >> 3), wireType: wireType, range: start..<i, value: valueStart..<i))
    }
    return fields
  }

  /// Reads a base-128 varint at `i`, advancing past it; nil if truncated or over 10 bytes.
  static func varint(_ bytes: UnsafeRawBufferPointer, at i: inout Int) -> UInt64? {
    var value: UInt64 = 0
    var shift: UInt64 = 0
    while i < bytes.count && shift < 70 {
      let b = bytes[i]
      i += 1
      value |= UInt64(b & 0x7F) << shift
      if b & 0x80 == 0 { return value }
      shift += 7
    }
    return nil
  }

  static func varintSize(_ v: UInt64) -> Int { v == 0 ? 1 : (64 - v.leadingZeroBitCount + 6) / 7 }

  static func writeVarint(_ v: UInt64, into out: UnsafeMutableRawBufferPointer, at i: inout Int) {
    var v = v
    while v >= 0x80 {
      out[i] = UInt8(truncatingIfNeeded: v) | 0x80
      v >>= 7
      i += 1
    }
    out[i] = UInt8(v)
    i += 1
  }
}

/// What the network lane's codecs share: where payloads are staged, and the metrics.
struct NetworkLane: Sendable {
  let dispatcher: Dispatcher
  var metrics: GatewayMetrics? = nil

  /// Stages the payload field (`field`, the last occurrence: protobuf's rule
  /// for a repeated singular field) in a pool and copies it there; returns the
  /// buffer and the message's other fields, concatenated (a valid message
  /// without the payload). Nil when nothing should be staged: malformed
  /// framing, no or an empty payload, the payload field with the wrong wire
  /// type, or a refusal (tenant share, pool full, too large). The caller then
  /// decodes the whole message the ordinary way.
  func stage(
    _ raw: UnsafeRawBufferPointer, field: UInt32, maxPayload: Int, sensitive: Bool,
    tenant: String = CallTenant.current ?? "default"
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
        staged.buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[payload.value]))
        var rest: [UInt8] = []
        rest.reserveCapacity(raw.count - payloadBytes)
        for f in fields where f.number != field { rest.append(contentsOf: UnsafeRawBufferPointer(rebasing: raw[f.range])) }
        return (staged, rest)
      case .failure(let r):
        refusal = r
      }
    }
    if refusal != .off { metrics?.recordStagingRefusal(tenant: tenant, reason: refusal.rawValue) }
    return nil
  }
}

/// A request as the network lane's deserializer delivers it: the message
/// without its payload when `staged` holds the payload, else the whole message.
struct LaneRequest<Message: SwiftProtobuf.Message & Sendable>: Sendable {
  var message: Message
  var staged: StagedInput?
}

/// A response for the network lane's serializer: `message` without its
/// payload field when `pooled` holds the result (written after `prefix`), else
/// the whole message.
struct LaneResponse<Message: SwiftProtobuf.Message & Sendable>: Sendable {
  var message: Message
  var pooled: PooledOutput? = nil
  /// Bytes written before the pooled output in the payload field (a named key's envelope header and nonce).
  var prefix = Data()
}

/// Decodes a request, staging its payload in a device pool when it can.
struct LaneRequestDeserializer<Message: SwiftProtobuf.Message & Sendable>: MessageDeserializer {
  let lane: NetworkLane
  /// Number of the payload (`bytes`) field in `Message`.
  let payloadField: UInt32
  /// Largest payload worth staging (the method's limit; larger calls are refused anyway).
  let maxPayload: Int
  /// The payload is plaintext: the staged buffer is zeroed when freed, and so
  /// is the copy of the other fields.
  let sensitive: Bool
  /// The other fields may hold a raw key (Encrypt, Decrypt): their copy is
  /// zeroed after decoding even when the payload is not secret (issue 17, finding 21).
  var carriesKey = false
  /// Zeroes the copy of the other fields (a test may watch it).
  var wipe: @Sendable (UnsafeMutableRawBufferPointer) -> Void = { accel_secure_zero($0.baseAddress, $0.count) }

  /// Whether the copy of the other fields is zeroed after decoding.
  var wipesRemainder: Bool { sensitive || carriesKey }

  func deserialize<Bytes: GRPCContiguousBytes>(_ serializedMessageBytes: Bytes) throws -> LaneRequest<Message> {
    let split = serializedMessageBytes.withUnsafeBytes {
      lane.stage($0, field: payloadField, maxPayload: maxPayload, sensitive: sensitive)
    }
    guard let (staged, rest) = split else {
      // Exactly what the generated code does: SwiftProtobuf decodes every field (the payload into `Data`).
      return LaneRequest(message: try ProtobufDeserializer<Message>().deserialize(serializedMessageBytes), staged: nil)
    }
    var others = rest
    defer {
      if wipesRemainder { others.withUnsafeMutableBytes { wipe($0) } }
    }
    do {
      return LaneRequest(message: try Message(serializedBytes: others), staged: staged)
    } catch {
      staged.release()
      throw RPCError(code: .invalidArgument, message: "Can't deserialize to message of type \(Message.self).", cause: error)
    }
  }
}

/// Encodes a response, copying a pooled result straight from the device pool
/// into the message bytes, then releasing the job's lease.
struct LaneResponseSerializer<Message: SwiftProtobuf.Message & Sendable>: MessageSerializer {
  /// Number of the payload field in `Message` (1 in all four responses).
  let payloadField: UInt32

  func serialize<Bytes: GRPCContiguousBytes>(_ response: LaneResponse<Message>) throws -> Bytes {
    guard let pooled = response.pooled, pooled.count + response.prefix.count > 0 else {
      response.pooled?.release()
      return try ProtobufSerializer<Message>().serialize(response.message)
    }
    defer { pooled.release() }  // the pool space is free once the bytes are out of it
    guard !pooled.isReleased else { throw RPCError(code: .internalError, message: "response payload already released") }
    let rest: [UInt8]
    do { rest = try response.message.serializedBytes() } catch {
      throw RPCError(code: .invalidArgument, message: "Can't serialize message of type \(Message.self).", cause: error)
    }
    // The payload field first: SwiftProtobuf writes fields in number order, and
    // it is field 1, so the bytes are the ones SwiftProtobuf would write.
    let length = response.prefix.count + pooled.count
    let tag = UInt64(payloadField) << 3 | UInt64(ProtoWire.lengthDelimited)
    let head = ProtoWire.varintSize(tag) + ProtoWire.varintSize(UInt64(length))
    // `GRPCContiguousBytes` offers no uninitialised allocation: the transport's
    // bytes are zero-filled first (a write pass, not a copy of the payload).
    var out = Bytes(repeating: 0, count: head + length + rest.count)
    out.withUnsafeMutableBytes { dst in
      var i = 0
      ProtoWire.writeVarint(tag, into: dst, at: &i)
      ProtoWire.writeVarint(UInt64(length), into: dst, at: &i)
      response.prefix.withUnsafeBytes { p in
        if let b = p.baseAddress, p.count > 0 { (dst.baseAddress! + i).copyMemory(from: b, byteCount: p.count) }
      }
      i += response.prefix.count
      // The one copy out: device pool → transport bytes.
      pooled.withBytes { p in
        if let b = p.baseAddress, p.count > 0 { (dst.baseAddress! + i).copyMemory(from: b, byteCount: p.count) }
      }
      i += pooled.count
      rest.withUnsafeBytes { p in
        if let b = p.baseAddress, p.count > 0 { (dst.baseAddress! + i).copyMemory(from: b, byteCount: p.count) }
      }
    }
    return out
  }
}

/// Serves Compress, Decompress, Encrypt and Decrypt through the network lane's
/// codecs. Registered after the generated `AcceleratorService`: the router
/// keeps the last handler registered for a method (`RPCRouter.registerHandler`
/// replaces), and interceptors are applied after every service registered
/// (`GRPCServer.init`), so these four get them too. The handlers only adapt
/// types: validation, jobs and statuses stay in `AcceleratorService`.
struct NetworkLaneService: RegistrableRPCService {
  let service: AcceleratorService
  let lane: NetworkLane

  // Payload field numbers, from proto/accelgate/v1/accelerator.proto (checked by NetworkLaneTests).
  static let compressData: UInt32 = 3
  static let decompressData: UInt32 = 2
  static let encryptPlaintext: UInt32 = 5
  static let decryptCiphertext: UInt32 = 5
  static let responsePayload: UInt32 = 1

  func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
    let service = self.service
    let limits = service.configuration
    router.registerHandler(
      forMethod: Accelgate_V1_Accelerator.Method.Compress.descriptor,
      deserializer: LaneRequestDeserializer<Accelgate_V1_CompressRequest>(
        lane: lane, payloadField: Self.compressData, maxPayload: limits.maxRequestBytes, sensitive: false),
      serializer: LaneResponseSerializer<Accelgate_V1_CompressResponse>(payloadField: Self.responsePayload)
    ) { request, _ in
      let r = try await ServerRequest(stream: request)
      let out = try await service.compress(r.message.message, metadata: r.metadata, lane: .pooled(r.message.staged))
      return StreamingServerResponse(single: ServerResponse(message: out))
    }
    router.registerHandler(
      forMethod: Accelgate_V1_Accelerator.Method.Decompress.descriptor,
      deserializer: LaneRequestDeserializer<Accelgate_V1_DecompressRequest>(
        lane: lane, payloadField: Self.decompressData, maxPayload: limits.maxRequestBytes, sensitive: false),
      serializer: LaneResponseSerializer<Accelgate_V1_DecompressResponse>(payloadField: Self.responsePayload)
    ) { request, _ in
      let r = try await ServerRequest(stream: request)
      let out = try await service.decompress(r.message.message, metadata: r.metadata, lane: .pooled(r.message.staged))
      return StreamingServerResponse(single: ServerResponse(message: out))
    }
    router.registerHandler(
      forMethod: Accelgate_V1_Accelerator.Method.Encrypt.descriptor,
      deserializer: LaneRequestDeserializer<Accelgate_V1_EncryptRequest>(
        lane: lane, payloadField: Self.encryptPlaintext, maxPayload: limits.maxRequestBytes, sensitive: true,
        carriesKey: true),
      serializer: LaneResponseSerializer<Accelgate_V1_EncryptResponse>(payloadField: Self.responsePayload)
    ) { request, _ in
      let r = try await ServerRequest(stream: request)
      let out = try await service.encrypt(
        r.message.message, tenant: TenantHeader.tenant(of: r.metadata), deadline: CallDeadline(metadata: r.metadata),
        lane: .pooled(r.message.staged))
      return StreamingServerResponse(single: ServerResponse(message: out))
    }
    router.registerHandler(
      forMethod: Accelgate_V1_Accelerator.Method.Decrypt.descriptor,
      deserializer: LaneRequestDeserializer<Accelgate_V1_DecryptRequest>(
        lane: lane, payloadField: Self.decryptCiphertext, maxPayload: service.configuration.requestLimits.sealedLimit, sensitive: false,
        carriesKey: true),
      serializer: LaneResponseSerializer<Accelgate_V1_DecryptResponse>(payloadField: Self.responsePayload)
    ) { request, _ in
      let r = try await ServerRequest(stream: request)
      let out = try await service.decrypt(
        r.message.message, tenant: TenantHeader.tenant(of: r.metadata), deadline: CallDeadline(metadata: r.metadata),
        lane: .pooled(r.message.staged))
      return StreamingServerResponse(single: ServerResponse(message: out))
    }
  }
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
