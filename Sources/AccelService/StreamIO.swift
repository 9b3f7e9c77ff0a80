/// The transport's side of a streaming RPC: where its requests come from and
/// where its responses go. The stream bodies (CompressStream, Submit, Watch,
/// reflection…) see only this, so they know nothing of the transport.
struct StreamIO<Request: Sendable, Response: Sendable>: Sendable {
  /// The next request; nil once the client has half-closed. One reader at a time.
  let next: @Sendable () async throws -> Request?
  /// Sends one response; returns once the transport has taken it. One writer at a time.
  let write: @Sendable (Response) async throws -> Void

  init(next: @escaping @Sendable () async throws -> Request?, write: @escaping @Sendable (Response) async throws -> Void) {
    self.next = next
    self.write = write
  }
}
