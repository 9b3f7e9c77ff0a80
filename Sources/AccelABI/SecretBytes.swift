/// Key material the project owns: one heap copy, zeroed when the last reference goes.
///
/// Swift arrays copy freely and never scrub their storage, so keys travel
/// through the gateway in this box instead; everything that reads it borrows
/// the bytes in place.
public final class SecretBytes: @unchecked Sendable {
  private let storage: UnsafeMutableRawBufferPointer

  public init(_ bytes: some Collection<UInt8>) {
    storage = .allocate(byteCount: max(1, bytes.count), alignment: 16)
    count = bytes.count
    _ = storage.initializeMemory(as: UInt8.self, from: bytes)
  }

  public let count: Int

  public func withBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
    try body(UnsafeRawBufferPointer(rebasing: storage[0..<count]))
  }

  deinit {
    SharedMemory.secureZero(storage.baseAddress!, count: storage.count)
    storage.deallocate()
  }
}
