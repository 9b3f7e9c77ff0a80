public import NIOCore

/// The handlers every stream a grpc-swift server accepts gets, in front of the
/// transport's own: for the transport's `onAcceptHTTP2Stream` callback.
public enum ServerStreamHandlers {
  @Sendable public static func install(on channel: any Channel) -> EventLoopFuture<Void> {
    channel.eventLoop.makeCompletedFuture {
      try channel.pipeline.syncOperations.addHandlers([FlushDataFramesHandler(), TimeoutHeaderGuard()], position: .first)
    }
  }
}
