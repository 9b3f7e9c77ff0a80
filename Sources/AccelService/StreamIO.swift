internal import GRPCCore

/// The transport's side of a streaming RPC: where its requests come from and
/// where its responses go. The stream bodies (CompressStream, Submit, Watch,
/// reflection…) see only this, so both edges run the same code.
struct StreamIO<Request: Sendable, Response: Sendable>: Sendable {
  /// The next request; nil once the client has half-closed. One reader at a time.
  let next: @Sendable () async throws -> Request?
  /// Sends one response; returns once the transport has taken it. One writer at a time.
  let write: @Sendable (Response) async throws -> Void

  init(next: @escaping @Sendable () async throws -> Request?, write: @escaping @Sendable (Response) async throws -> Void) {
    self.next = next
    self.write = write
  }

  /// grpc-swift's request sequence and response writer.
  init(_ messages: RPCAsyncSequence<Request, any Error>, _ writer: RPCWriter<Response>) {
    let source = IteratorBox(messages.makeAsyncIterator())
    self.init(next: { try await source.next() }, write: { try await writer.write($0) })
  }

  /// Holds a request iterator for the one task that reads it.
  private final class IteratorBox: @unchecked Sendable {
    private var iterator: RPCAsyncSequence<Request, any Error>.AsyncIterator
    init(_ iterator: RPCAsyncSequence<Request, any Error>.AsyncIterator) { self.iterator = iterator }
    func next() async throws -> Request? { try await iterator.next() }
  }
}
