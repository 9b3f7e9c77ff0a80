internal import CAccelGRPC
internal import Synchronization

/// One call on the C-core edge, from its arrival to its status.
///
/// The handler answers exactly once, with `respond` or `fail`, from any
/// thread: the completion-queue thread that received the call, or the
/// device's reaper when a job completes. A client's cancellation (or its
/// deadline) runs the closure set with `onCancel`, at most once.
package final class CoreCall: @unchecked Sendable {
  let raw: OpaquePointer
  /// Batches in flight (CLOSED and SENT from the start, and each receive and
  /// write); the C call and this object go with the last one's event.
  private let holds = Atomic<Int>(2)
  private let answered = Atomic<Bool>(false)
  private let cancellation = Mutex<Cancellation>(.watching(nil))
  /// What runs when the receive or the write in flight finishes (one of each at a time).
  private let pending = Mutex<Pending>(Pending())

  private struct Pending {
    var receive: (@Sendable (Received) -> Void)?
    var write: (@Sendable (Bool) -> Void)?
  }

  /// What a streaming call's receive gives.
  package enum Received {
    /// The next message; its bytes are valid only during the callback.
    case message(UnsafeRawBufferPointer)
    /// The client half-closed: no more messages.
    case end
    /// The call ended (cancelled, deadline, connection gone).
    case failed
  }

  private enum Cancellation {
    case watching((@Sendable () -> Void)?)
    case cancelled
  }

  init(raw: OpaquePointer) { self.raw = raw }

  /// The request message's bytes (valid for the call's life), or an empty buffer.
  package var payload: UnsafeRawBufferPointer {
    var length = 0
    guard let p = accel_grpc_call_payload(raw, &length) else { return UnsafeRawBufferPointer(start: nil, count: 0) }
    return UnsafeRawBufferPointer(start: p, count: length)
  }

  /// The request message's slices as the core holds them, in order and in
  /// place (valid for the call's life); empty for no message; nil when the
  /// message can only be read whole (`payload`: it came compressed).
  package var payloadSlices: [UnsafeRawBufferPointer]? {
    // Asked into stack space first: most messages come in a few slices.
    func read(room: Int) -> (count: Int, slices: [UnsafeRawBufferPointer]) {
      withUnsafeTemporaryAllocation(of: accel_grpc_bytes.self, capacity: room) { parts in
        let n = accel_grpc_call_slices(raw, parts.baseAddress, room)
        guard n >= 0, n <= room else { return (n, []) }
        return (n, parts.prefix(n).map { UnsafeRawBufferPointer(start: $0.bytes, count: $0.length) })
      }
    }
    var (n, slices) = read(room: 32)
    if n > 32 { (n, slices) = read(room: n) }
    return n >= 0 ? slices : nil
  }

  /// The first value of request metadata `key` (lower case).
  package func metadata(_ key: String) -> String? {
    var length = 0
    guard let p = accel_grpc_call_metadata(raw, key, &length) else { return nil }
    return String(decoding: UnsafeRawBufferPointer(start: p, count: length), as: UTF8.self)
  }

  /// The method path of a call to an unregistered method.
  package var path: String {
    var length = 0
    guard let p = accel_grpc_call_path(raw, &length) else { return "" }
    return String(decoding: UnsafeRawBufferPointer(start: p, count: length), as: UTF8.self)
  }

  /// Time left until the client's deadline; nil when it set none.
  package var timeRemaining: Duration? {
    let ns = accel_grpc_call_deadline_remaining_ns(raw)
    return ns == Int64.max ? nil : .nanoseconds(ns)
  }

  /// Ends the call now with CANCELLED, whatever it is doing; what the core
  /// still holds for it (a reply it could not send) is released. Safe from
  /// any thread at any time; a call already gone is left alone.
  package func cancel() {
    guard retain() else { return }
    accel_grpc_call_cancel(raw)
    drop()
  }

  /// Runs `action` when the client cancels (now, if it already has).
  package func onCancel(_ action: @escaping @Sendable () -> Void) {
    let runNow = cancellation.withLock { c -> Bool in
      if case .cancelled = c { return true }
      c = .watching(action)
      return false
    }
    if runNow { action() }
  }

  /// Answers OK with `message` (its parts in order) and `trailers`.
  package func respond(_ message: [CorePart], initial: [(String, String)] = [], trailers: [(String, String)] = []) {
    send(status: 0, statusMessage: "", message: message, initial: initial, trailers: trailers)
  }

  /// Ends a streaming call OK, after its messages (`write`), with `trailers`.
  package func end(initial: [(String, String)] = [], trailers: [(String, String)] = []) {
    send(status: 0, statusMessage: "", message: nil, initial: initial, trailers: trailers)
  }

  /// Ends the call with a status other than OK.
  package func fail(code: Int, message: String, initial: [(String, String)] = [], trailers: [(String, String)] = []) {
    send(status: code, statusMessage: message, message: nil, initial: initial, trailers: trailers)
  }

  private func send(
    status: Int, statusMessage: String, message: [CorePart]?, initial: [(String, String)], trailers: [(String, String)]
  ) {
    guard !answered.exchange(true, ordering: .acquiringAndReleasing) else {
      // A second answer would be a bug; the parts it holds still go back.
      message?.forEach { $0.releaseUnsent() }
      return
    }
    let rc = CoreStrings.withKeyValues(initial) { ini in
      CoreStrings.withKeyValues(trailers) { trl in
        (message ?? []).map(\.cPart).withUnsafeBufferPointer { parts in
          accel_grpc_call_respond(
            raw, ini.baseAddress, ini.count, message == nil ? 0 : 1, parts.baseAddress, parts.count, Int32(status),
            statusMessage, trl.baseAddress, trl.count)
        }
      }
    }
    // Refused by the core (the call is gone): no SENT event will come.
    if rc != 0 { drop() }
  }

  /// Reads a streaming call's next message; `handler` runs once, on a
  /// completion-queue thread. One receive at a time.
  package func receive(_ handler: @escaping @Sendable (Received) -> Void) {
    // Once answered (or freed) the call takes no more reads: a stream body may still ask after its status went out.
    guard !answered.load(ordering: .acquiring), retain() else { return handler(.failed) }
    pending.withLock { $0.receive = handler }
    if accel_grpc_call_receive(raw) != 0 {
      pending.withLock { $0.receive = nil }
      drop()  // the batch never started: its hold goes (the last one frees the call)
      handler(.failed)
    }
  }

  /// Writes one message of a streaming response (`initial` goes with the
  /// first); `completion` runs once, with false when the call has ended. One
  /// write at a time.
  package func write(_ message: [CorePart], initial: [(String, String)] = [], completion: @escaping @Sendable (Bool) -> Void) {
    guard !answered.load(ordering: .acquiring), retain() else {
      message.forEach { $0.releaseUnsent() }
      return completion(false)
    }
    pending.withLock { $0.write = completion }
    let rc = CoreStrings.withKeyValues(initial) { ini in
      message.map(\.cPart).withUnsafeBufferPointer { parts in
        accel_grpc_call_write(raw, ini.baseAddress, ini.count, parts.baseAddress, parts.count)
      }
    }
    if rc != 0 {
      pending.withLock { $0.write = nil }
      drop()  // the batch never started: its hold goes (the last one frees the call)
      completion(false)
    }
  }

  /// Takes a hold for a batch about to start, unless the last hold has gone
  /// (the C call is freed then, and must not be touched).
  private func retain() -> Bool {
    var current = holds.load(ordering: .acquiring)
    while current > 0 {
      let (exchanged, seen) = holds.compareExchange(
        expected: current, desired: current + 1, ordering: .acquiringAndReleasing)
      if exchanged { return true }
      current = seen
    }
    return false
  }

  /// The RECEIVED event.
  func received(ok: Bool) {
    let handler = pending.withLock { p in defer { p.receive = nil }; return p.receive }
    if let handler {
      var length = 0
      if !ok {
        handler(.failed)
      } else if let p = accel_grpc_call_payload(raw, &length) {
        handler(.message(UnsafeRawBufferPointer(start: p, count: length)))
      } else if accel_grpc_call_has_message(raw) != 0 {
        handler(.failed)  // a message the core could not read (an unknown compression)
      } else {
        handler(.end)
      }
    }
    drop()
  }

  /// The WROTE event.
  func wrote(ok: Bool) {
    let completion = pending.withLock { p in defer { p.write = nil }; return p.write }
    completion?(ok)
    drop()
  }

  /// The CLOSED event: the call has ended on the wire.
  func closed() {
    if accel_grpc_call_was_cancelled(raw) != 0 {
      let action = cancellation.withLock { c -> (@Sendable () -> Void)? in
        defer { c = .cancelled }
        if case .watching(let a) = c { return a }
        return nil
      }
      action?()
    }
    drop()
  }

  /// Drops one hold; the last frees the C call and this object.
  ///
  /// This count alone decides when the C call goes. A second count on the C
  /// side once did too: between `retain` taking a hold for a new batch and the
  /// C side counting that batch, a concurrent last event could free the call
  /// under the batch being started (a double free the API fuzzer found under
  /// ASan with many concurrent streams; fuzz/api/regressions/stream-receive-free-race.jsonl).
  func drop() {
    guard holds.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 else { return }
    accel_grpc_call_destroy(raw)
    Unmanaged.passUnretained(self).release()
  }
}
