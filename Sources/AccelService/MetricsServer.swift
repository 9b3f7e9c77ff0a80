internal import NIOCore
internal import NIOHTTP1
internal import NIOPosix

/// A minimal HTTP/1.1 server for Prometheus: `GET /metrics` returns the text
/// exposition format, `GET /healthz` returns "ok", anything else 404. It runs on
/// its own event loop, so a slow scraper never touches the gRPC loops.
final class MetricsServer: Sendable {
  private let channel: any Channel
  private let group: MultiThreadedEventLoopGroup

  /// Binds `host:port` (port 0 picks one) and serves `render()` for each scrape.
  init(host: String, port: Int, render: @escaping @Sendable () -> [UInt8]) async throws {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    self.group = group
    do {
      channel = try await ServerBootstrap(group: group)
        .serverChannelOption(.backlog, value: 64)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelInitializer { channel in
          channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true).flatMap {
            channel.pipeline.addHandler(MetricsHandler(render: render))
          }
        }
        .bind(host: host, port: port).get()
    } catch {
      try? await group.shutdownGracefully()
      throw error
    }
  }

  var port: Int? { channel.localAddress?.port }

  func close() async {
    try? await channel.close()
    try? await group.shutdownGracefully()
  }
}

private final class MetricsHandler: ChannelInboundHandler, Sendable {
  typealias InboundIn = HTTPServerRequestPart
  typealias OutboundOut = HTTPServerResponsePart
  let render: @Sendable () -> [UInt8]

  init(render: @escaping @Sendable () -> [UInt8]) { self.render = render }

  func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    guard case .head(let head) = unwrapInboundIn(data) else { return }
    let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
    let (status, type, body): (HTTPResponseStatus, String, [UInt8]) =
      switch (head.method, path) {
      case (.GET, "/metrics"): (.ok, "text/plain; version=0.0.4; charset=utf-8", render())
      case (.GET, "/healthz"): (.ok, "text/plain", Array("ok\n".utf8))
      case (.GET, _): (.notFound, "text/plain", Array("not found; try /metrics\n".utf8))
      default: (.methodNotAllowed, "text/plain", Array("GET only\n".utf8))
      }
    var headers = HTTPHeaders()
    headers.add(name: "Content-Type", value: type)
    headers.add(name: "Content-Length", value: "\(body.count)")
    let keepAlive = head.isKeepAlive
    if !keepAlive { headers.add(name: "Connection", value: "close") }
    context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
    context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
    let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
    if !keepAlive {
      let channel = context.channel
      done.whenComplete { _ in channel.close(promise: nil) }
    }
  }
}
