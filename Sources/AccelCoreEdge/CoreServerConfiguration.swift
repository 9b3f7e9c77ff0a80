/// How the C-core edge listens and what it allows. Defaults follow the
/// gateway's (`ServiceConfiguration`); 0 leaves the C core's own default.
package struct CoreServerConfiguration: Sendable, Equatable {
  /// Addresses to listen on: "host:port" or "unix:/path".
  package var addresses: [String] = ["127.0.0.1:50051"]
  /// TLS for every address: PEM key and certificate chain; with a client CA, mTLS.
  package var tls: TLS? = nil
  /// Largest inbound message; a larger one ends RESOURCE_EXHAUSTED, the connection stays.
  package var maxReceiveMessageBytes = 4 << 20
  package var maxSendMessageBytes = 0
  package var maxConcurrentStreams = 0
  package var keepaliveTimeMilliseconds = 0
  package var keepaliveTimeoutMilliseconds = 0
  package var maxConnectionIdleMilliseconds = 0
  package var maxConnectionAgeMilliseconds = 0
  package var maxConnectionAgeGraceMilliseconds = 0
  package var http2MaxFrameSize = 0
  /// Each stream's initial HTTP/2 window (the core grows it from there by BDP probing).
  package var http2StreamWindowBytes = 0
  /// Completion-queue threads, each blocking in `grpc_completion_queue_next`.
  package var threads = 1
  /// Calls asked for in advance, per method: how many may arrive at once before the threads ask again.
  package var callsPerMethod = 32

  package struct TLS: Sendable, Equatable {
    package var keyPEM: String
    package var certificateChainPEM: String
    /// Clients must present a certificate this CA signed (mTLS).
    package var clientCAPEM: String?
    package init(keyPEM: String, certificateChainPEM: String, clientCAPEM: String? = nil) {
      self.keyPEM = keyPEM
      self.certificateChainPEM = certificateChainPEM
      self.clientCAPEM = clientCAPEM
    }
  }

  package init() {}
}
