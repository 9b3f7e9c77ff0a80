public import NIOCore
public import NIOHTTP2
import NIOHPACK

/// Works around a crash in grpc-swift-2 2.4.3 (docs/ARCHITECTURE.md, "Transport
/// workarounds"): a request whose `grpc-timeout` has a negative amount (`-1S`)
/// reaches `Timeout.init(amount:unit:)`, whose precondition kills the process.
///
/// The gRPC over HTTP/2 spec allows only `1*8DIGIT` and one of `H M S m u n`.
/// This handler sits in front of the transport on every accepted stream and
/// removes a `grpc-timeout` that does not match, so the call runs with no
/// deadline from the header, which is what the C core does with a value it
/// cannot parse. Valid values pass through untouched.
public final class TimeoutHeaderGuard: ChannelInboundHandler, Sendable {
  public typealias InboundIn = HTTP2Frame.FramePayload
  public typealias InboundOut = HTTP2Frame.FramePayload

  public init() {}

  public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
    guard case .headers(var headers) = unwrapInboundIn(data),
      headers.headers.contains(name: "grpc-timeout"),
      !headers.headers["grpc-timeout"].allSatisfy({ Self.isValid($0) })
    else {
      context.fireChannelRead(data)
      return
    }
    headers.headers.remove(name: "grpc-timeout")
    context.fireChannelRead(wrapInboundOut(.headers(headers)))
  }

  /// `1*8DIGIT TimeoutUnit`, byte for byte (no sign, no spaces).
  public static func isValid(_ value: String) -> Bool {
    let bytes = value.utf8
    guard let unit = bytes.last, (2...9).contains(bytes.count), Array("HMSmun".utf8).contains(unit) else { return false }
    return bytes.dropLast().allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) }
  }
}
