/// Streaming calls from Swift tasks: a stream body awaits each message and
/// each write, while the completion-queue thread resumes it.
extension CoreCall {
  /// The call ended before the operation finished (cancelled, past its deadline, or its connection gone).
  package struct Ended: Error, Equatable {}

  /// The next message, decoded by `decode` from the core's bytes on the
  /// completion-queue thread; nil once the client has half-closed.
  package func next<T: Sendable>(_ decode: @escaping @Sendable (UnsafeRawBufferPointer) throws -> T) async throws -> T? {
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T?, any Error>) in
      receive { received in
        switch received {
        case .message(let bytes): continuation.resume(with: Result { try decode(bytes) })
        case .end: continuation.resume(returning: nil)
        case .failed: continuation.resume(throwing: Ended())
        }
      }
    }
  }

  /// Writes one message and returns once the core has taken it (HTTP/2 flow
  /// control may hold it: a client that does not read holds the writer).
  package func write(_ message: [CorePart], initial: [(String, String)] = []) async throws {
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
      write(message, initial: initial) { ok in
        if ok { continuation.resume() } else { continuation.resume(throwing: Ended()) }
      }
    }
  }
}
