public import NIOCore
public import NIOHTTP2

/// Works around a flush deadlock in grpc-swift-nio-transport 2.9.2 with
/// swift-nio-http2 1.46.0 (docs/ARCHITECTURE.md, "Transport workarounds").
///
/// For unary RPCs the transport writes the message's DATA frame without a flush
/// and flushes only with the trailers, or when the stream turns unwritable. If
/// the connection went unwritable just before that write (a full socket buffer:
/// routine on a Unix socket with MiB messages), the stream is already unwritable,
/// so no writability event fires and nothing flushes; when the connection drains,
/// the unflushed MiB still counts against the stream, which stays unwritable, and
/// the writer waits forever for writability to send the trailers. The call hangs
/// until its deadline. Flushing every outbound DATA frame as it is written removes
/// the deadlock; it only gives up coalescing a message's DATA and trailers into
/// one flush.
public final class FlushDataFramesHandler: ChannelOutboundHandler, Sendable {
  public typealias OutboundIn = HTTP2Frame.FramePayload
  public typealias OutboundOut = HTTP2Frame.FramePayload

  public init() {}

  public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
    let isData = if case .data = unwrapOutboundIn(data) { true } else { false }
    context.write(data, promise: promise)
    if isData { context.flush() }
  }

  /// For the transports' `onAcceptHTTP2Stream` / `onCreateHTTP2Stream` callbacks:
  /// installs the handler at the front of a new stream channel's pipeline.
  @Sendable public static func install(on channel: any Channel) -> EventLoopFuture<Void> {
    channel.eventLoop.makeCompletedFuture {
      try channel.pipeline.syncOperations.addHandler(FlushDataFramesHandler(), position: .first)
    }
  }
}
