package import AccelABI

/// The size limits requests are checked against; the gateway fills them from
/// its configuration (`ServiceConfiguration`).
package struct RequestLimits: Sendable, Equatable {
  /// Largest payload of a unary request or of one stream message.
  package var maxRequestBytes = 4 << 20
  /// Largest output a decompression (or a decrypt-and-decompress chain) produces.
  package var maxDecompressedBytes = 4 << 20
  /// Largest additional authenticated data of an AEAD request.
  package var maxAADBytes = 64 * 1024

  package init(maxRequestBytes: Int = 4 << 20, maxDecompressedBytes: Int = 4 << 20, maxAADBytes: Int = 64 * 1024) {
    self.maxRequestBytes = maxRequestBytes
    self.maxDecompressedBytes = maxDecompressedBytes
    self.maxAADBytes = maxAADBytes
  }

  /// The largest ciphertext Decrypt takes: whatever Encrypt can return (the
  /// tag, the envelope and, for chained jobs, the compress bound on top of the request limit).
  package var sealedLimit: Int {
    Int(BufferSizing.compressBound(UInt64(maxRequestBytes))) + CryptoSizing.tagLength + Envelope.overhead
  }

  /// The output bound of a request asking for at most `requested` bytes (0: the server's bound).
  package func outputLimit(requested: UInt64) -> Int {
    requested == 0 ? maxDecompressedBytes : Int(min(UInt64(maxDecompressedBytes), requested))
  }

  /// Refuses a payload over the request limit.
  package func check(payload size: Int) throws(RequestError) {
    guard size <= maxRequestBytes else { throw .payloadTooLarge(size: size, limit: maxRequestBytes) }
  }
}
