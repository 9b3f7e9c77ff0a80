internal import CAccelGRPC
internal import Foundation
internal import Synchronization

/// A gRPC server on gRPC's C core: registered methods whose request message
/// arrives with the call, and one handler for every other path.
///
/// Completion-queue threads block in `grpc_completion_queue_next`; each new
/// call is handed to its method's handler on that thread, which answers it
/// (`CoreCall.respond` / `fail`) then or later, from any thread. No Swift
/// task is involved on the way.
package final class CoreServer: @unchecked Sendable {
  package typealias Handler = @Sendable (CoreCall) -> Void

  /// A method the server serves by name.
  package struct Method: Sendable {
    package enum Shape: Sendable {
      /// One request message, read with the call (`CoreCall.payload`).
      case unary
      /// Request messages read one at a time (`CoreCall.receive`), responses written as they come (`write`).
      case streaming
    }
    package var path: String
    package var shape: Shape
    package var handler: Handler
    package init(_ path: String, _ shape: Shape = .unary, handler: @escaping Handler) {
      self.path = path
      self.shape = shape
      self.handler = handler
    }
  }

  package enum StartError: Error, Equatable {
    case create
    case method(String)
    case listen(String)
  }

  private let server: OpaquePointer
  private let configuration: CoreServerConfiguration
  private let handlers: [Handler]
  private let unregistered: Handler
  private let stopping = Atomic<Bool>(false)
  private let destroyed = Atomic<Bool>(false)
  private let shutdownDone = DispatchSemaphore(value: 0)
  /// Set at the SHUTDOWN event; tasks in `drained` wait for it.
  private let drainState = Mutex<(done: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))
  private let threadsDone = DispatchGroup()
  /// The bound port of each TCP address, in order (0 for Unix sockets).
  package let ports: [Int]

  /// Registers `methods` (path → handler) and binds every address; `start` begins serving.
  package init(
    configuration: CoreServerConfiguration, methods: [Method],
    unregistered: @escaping Handler
  ) throws(StartError) {
    var options = accel_grpc_server_options(
      max_receive_message_length: Int32(clamping: configuration.maxReceiveMessageBytes),
      max_send_message_length: Int32(clamping: configuration.maxSendMessageBytes),
      max_concurrent_streams: Int32(clamping: configuration.maxConcurrentStreams),
      keepalive_time_ms: Int32(clamping: configuration.keepaliveTimeMilliseconds),
      keepalive_timeout_ms: Int32(clamping: configuration.keepaliveTimeoutMilliseconds),
      max_connection_idle_ms: Int32(clamping: configuration.maxConnectionIdleMilliseconds),
      max_connection_age_ms: Int32(clamping: configuration.maxConnectionAgeMilliseconds),
      max_connection_age_grace_ms: Int32(clamping: configuration.maxConnectionAgeGraceMilliseconds),
      http2_max_frame_size: Int32(clamping: configuration.http2MaxFrameSize),
      http2_stream_window_bytes: Int32(clamping: configuration.http2StreamWindowBytes))
    guard let server = accel_grpc_server_create(&options) else { throw .create }
    self.server = server
    self.configuration = configuration
    self.handlers = methods.map(\.handler)
    self.unregistered = unregistered
    for (i, m) in methods.enumerated() {
      guard accel_grpc_server_add_method(server, m.path, m.shape == .streaming ? 1 : 0) == Int32(i) else {
        accel_grpc_server_destroy(server)
        throw .method(m.path)
      }
    }
    var ports: [Int] = []
    for address in configuration.addresses {
      let port =
        if let tls = configuration.tls {
          accel_grpc_server_add_tls_port(server, address, tls.keyPEM, tls.certificateChainPEM, tls.clientCAPEM)
        } else {
          accel_grpc_server_add_insecure_port(server, address)
        }
      guard port >= 0 else {
        accel_grpc_server_destroy(server)
        throw .listen(address)
      }
      ports.append(Int(port))
    }
    self.ports = ports
  }

  /// Starts the completion-queue threads and asks for the first calls.
  package func start() {
    accel_grpc_server_start(server)
    for method in -1..<handlers.count {
      for _ in 0..<(method < 0 ? 4 : configuration.callsPerMethod) { request(method) }
    }
    for i in 0..<max(1, configuration.threads) {
      threadsDone.enter()
      let t = Thread { [self] in
        Thread.current.name = "grpc-cq-\(i)"
        poll()
        threadsDone.leave()
      }
      t.start()
    }
  }

  /// Stops taking new calls; open ones go on (a SHUTDOWN event follows when they have ended).
  package func beginShutdown() {
    guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
    accel_grpc_server_shutdown(server)
  }

  /// Returns once the server has stopped taking calls and every open call has
  /// ended (after `beginShutdown`).
  package func drained() async {
    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
      let done = drainState.withLock { s -> Bool in
        if !s.done { s.waiters.append(c) }
        return s.done
      }
      if done { c.resume() }
    }
  }

  /// Stops taking calls and ends every open one with CANCELLED (a SHUTDOWN
  /// event follows once they have all ended).
  package func cancelAll() {
    beginShutdown()
    accel_grpc_server_cancel_all(server)
  }

  /// Stops taking calls and waits up to `grace` for open ones to end, then
  /// cancels the rest; returns once the threads have stopped. Blocks: call it
  /// from a thread of its own, not from a task.
  package func shutdown(grace: Duration) {
    guard !destroyed.exchange(true, ordering: .acquiringAndReleasing) else { return }
    beginShutdown()
    let seconds = Double(grace.components.seconds) + Double(grace.components.attoseconds) / 1e18
    if shutdownDone.wait(timeout: .now() + max(0, seconds)) == .timedOut {
      accel_grpc_server_cancel_all(server)
      shutdownDone.wait()
    }
    // Closing shuts the queue down; the threads drain it and return, and only then is it freed.
    accel_grpc_server_close(server)
    threadsDone.wait()
    accel_grpc_server_free(server)
  }

  private func request(_ method: Int) {
    guard !stopping.load(ordering: .acquiring) else { return }
    // The call object is created with the request; its Swift side follows on arrival.
    _ = accel_grpc_call_request(server, Int32(method), nil)
  }

  private func poll() {
    var kind = accel_grpc_event_kind(rawValue: 0)
    var raw: OpaquePointer?
    var ok: Int32 = 0
    while accel_grpc_server_next(server, &kind, &raw, &ok) != 0 {
      switch kind {
      case ACCEL_GRPC_EVENT_SHUTDOWN:
        shutdownDone.signal()
        let waiters = drainState.withLock { s in
          s.done = true
          defer { s.waiters = [] }
          return s.waiters
        }
        for w in waiters { w.resume() }
      case ACCEL_GRPC_EVENT_NEW_CALL:
        guard let raw else { continue }
        let method = Int(accel_grpc_call_method(raw))
        guard ok != 0 else {
          accel_grpc_call_destroy(raw)
          continue
        }
        request(method)
        let call = CoreCall(raw: raw)
        let retained = Unmanaged.passRetained(call)
        accel_grpc_call_set_user(raw, retained.toOpaque())
        guard accel_grpc_call_begin(raw) == 0 else {
          accel_grpc_call_cancel(raw)
          accel_grpc_call_destroy(raw)
          retained.release()
          continue
        }
        (method >= 0 && method < handlers.count ? handlers[method] : unregistered)(call)
      case ACCEL_GRPC_EVENT_CLOSED, ACCEL_GRPC_EVENT_SENT, ACCEL_GRPC_EVENT_RECEIVED, ACCEL_GRPC_EVENT_WROTE:
        guard let raw, let user = accel_grpc_call_user(raw) else { continue }
        let call = Unmanaged<CoreCall>.fromOpaque(user).takeUnretainedValue()
        switch kind {
        case ACCEL_GRPC_EVENT_CLOSED: call.closed()
        case ACCEL_GRPC_EVENT_RECEIVED: call.received(ok: ok != 0)
        case ACCEL_GRPC_EVENT_WROTE: call.wrote(ok: ok != 0)
        default: call.drop()
        }
      default:
        continue
      }
    }
  }
}
