/// Bytes allocated for the C core to send in place: a response is encoded
/// straight into one (its encoder sees a byte container), and the part made
/// from it keeps the allocation until the core is done with it, so the
/// encoded message is never copied again.
package struct CoreBuffer: @unchecked Sendable {
  private final class Storage: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer
    init(count: Int) { bytes = .allocate(byteCount: max(count, 1), alignment: 16) }
    deinit { bytes.deallocate() }
  }

  private var storage: Storage
  package private(set) var count: Int

  package init(repeating byte: UInt8, count: Int) {
    storage = Storage(count: count)
    self.count = count
    if count > 0 { storage.bytes.baseAddress?.initializeMemory(as: UInt8.self, repeating: byte, count: count) }
  }

  package init<S: Sequence>(_ sequence: S) where S.Element == UInt8 {
    let array = Array(sequence)
    self.init(repeating: 0, count: array.count)
    array.withUnsafeBytes { storage.bytes.copyMemory(from: $0) }
  }

  package func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
    try body(UnsafeRawBufferPointer(rebasing: storage.bytes[0..<count]))
  }

  package mutating func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
    // Not shared: the encoder owns the only copy while it writes.
    try body(UnsafeMutableRawBufferPointer(rebasing: storage.bytes[0..<count]))
  }

  /// The bytes as a part sent in place; the allocation lives until the core releases it.
  package var part: CorePart {
    let storage = self.storage
    return CorePart.inPlace(UnsafeRawBufferPointer(rebasing: storage.bytes[0..<count])) { _ = storage }
  }
}
