internal import AccelMessages

/// A request that may name spans of client memory for its input and output (the local lane).
protocol SpannedRequest {
  var hasInputRegion: Bool { get }
  var inputRegion: Accelgate_V1_RegionSpan { get }
  var hasOutputRegion: Bool { get }
  var outputRegion: Accelgate_V1_RegionSpan { get }
}

extension SpannedRequest {
  /// The input span the request names, if any.
  var inputRegionIfSet: Accelgate_V1_RegionSpan? { hasInputRegion ? inputRegion : nil }
  /// The output span the request names, if any.
  var outputRegionIfSet: Accelgate_V1_RegionSpan? { hasOutputRegion ? outputRegion : nil }
}

extension Accelgate_V1_CompressRequest: SpannedRequest {}
extension Accelgate_V1_DecompressRequest: SpannedRequest {}
extension Accelgate_V1_EncryptRequest: SpannedRequest {}
extension Accelgate_V1_DecryptRequest: SpannedRequest {}
