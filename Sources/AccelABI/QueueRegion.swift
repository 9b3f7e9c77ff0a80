public import CAccelABI
internal import CAccelSys
import Glibc

/// One mapping of a hardware-queue region: the memfd, its mapping in this
/// process, and typed, ordered access to the header's shared fields.
///
/// The device and the driver each hold their own `QueueRegion` over the same
/// memfd, so even the embedded device talks to the driver through real
/// shared pages, never through Swift objects.
public final class QueueRegion: @unchecked Sendable {
  /// The memfd backing the region. Owned: closed on deinit.
  public let fd: Int32
  public let layout: RegionLayout
  public let base: UnsafeMutableRawPointer
  public let header: UnsafeMutablePointer<accel_region_header>
  public let sqIndex: RingIndex
  public let cqIndex: RingIndex

  private let sqBase: UnsafeMutablePointer<accel_sqe>
  private let cqBase: UnsafeMutablePointer<accel_cqe>

  /// Creates a new zero-filled region sized for `layout` and writes its header. Device side.
  public static func create(layout: RegionLayout, queueID: UInt32, weight: UInt32, name: String) throws(RegionError)
    -> QueueRegion
  {
    let fd = accel_memfd_create(name)
    guard fd >= 0 else { throw .system("memfd_create", accel_errno()) }
    guard ftruncate(fd, off_t(layout.regionSize)) == 0 else {
      let e = accel_errno()
      close(fd)
      throw .system("ftruncate", e)
    }
    // The size is final: seal it so no peer can shrink the file under a mapping (SIGBUS).
    _ = accel_memfd_seal_size(fd)
    guard let base = accel_map_shared(fd, layout.regionSize) else {
      let e = accel_errno()
      close(fd)
      throw .system("mmap", e)
    }
    let region = QueueRegion(fd: fd, layout: layout, base: base)
    layout.initialize(header: region.header, queueID: queueID, weight: weight)
    return region
  }

  /// Maps an existing region from its memfd and validates the header. Driver side.
  /// Takes ownership of `fd`.
  public static func attach(fd: Int32) throws(RegionError) -> QueueRegion {
    var st = stat()
    guard fstat(fd, &st) == 0 else {
      let e = accel_errno()
      close(fd)
      throw .system("fstat", e)
    }
    let size = UInt64(st.st_size)
    guard size >= UInt64(ACCEL_HEADER_SIZE) else {
      close(fd)
      throw .abi(.invalidGeometry("region smaller than its header"))
    }
    // A region that can shrink could SIGBUS us mid-job: insist on the seal.
    guard accel_memfd_is_shrink_sealed(fd) == 1 else {
      close(fd)
      throw .abi(.invalidGeometry("region is not sealed against shrinking"))
    }
    guard let base = accel_map_shared(fd, size) else {
      let e = accel_errno()
      close(fd)
      throw .system("mmap", e)
    }
    let header = base.assumingMemoryBound(to: accel_region_header.self)
    do {
      let layout = try RegionLayout(validating: header, mappedSize: size)
      return QueueRegion(fd: fd, layout: layout, base: base, mappedSize: size)
    } catch {
      _ = accel_unmap(base, size)
      close(fd)
      throw .abi(error)
    }
  }

  private let mappedSize: UInt64

  private init(fd: Int32, layout: RegionLayout, base: UnsafeMutableRawPointer, mappedSize: UInt64? = nil) {
    self.fd = fd
    self.layout = layout
    self.mappedSize = mappedSize ?? layout.regionSize
    self.base = base
    self.header = base.assumingMemoryBound(to: accel_region_header.self)
    self.sqBase = (base + Int(layout.sqOffset)).assumingMemoryBound(to: accel_sqe.self)
    self.cqBase = (base + Int(layout.cqOffset)).assumingMemoryBound(to: accel_cqe.self)
    self.sqIndex = RingIndex(entries: layout.sqEntries)
    self.cqIndex = RingIndex(entries: layout.cqEntries)
  }

  deinit {
    _ = accel_unmap(base, mappedSize)
    close(fd)
  }

  public var queueID: UInt32 { header.pointee.queue_id }

  // MARK: ring slots

  @inlinable public func sqe(at index: UInt32) -> UnsafeMutablePointer<accel_sqe> { sqSlot(sqIndex.slot(index)) }
  @inlinable public func cqe(at index: UInt32) -> UnsafeMutablePointer<accel_cqe> { cqSlot(cqIndex.slot(index)) }
  @usableFromInline func sqSlot(_ i: Int) -> UnsafeMutablePointer<accel_sqe> { sqBase + i }
  @usableFromInline func cqSlot(_ i: Int) -> UnsafeMutablePointer<accel_cqe> { cqBase + i }

  /// Pointer to `length` bytes at a region offset already checked by the caller.
  @inlinable public func bytes(at offset: UInt64) -> UnsafeMutableRawPointer { base + Int(offset) }

  // MARK: shared fields, with the orderings the ABI prescribes

  public func field(_ keyPath: KeyPath<accel_region_header, UInt32>) -> UnsafeMutablePointer<UInt32> {
    let offset = MemoryLayout<accel_region_header>.offset(of: keyPath)!
    return (base + offset).assumingMemoryBound(to: UInt32.self)
  }

  public func field64(_ keyPath: KeyPath<accel_region_header, UInt64>) -> UnsafeMutablePointer<UInt64> {
    let offset = MemoryLayout<accel_region_header>.offset(of: keyPath)!
    return (base + offset).assumingMemoryBound(to: UInt64.self)
  }
}

/// Failures creating or attaching a region.
public enum RegionError: Error, CustomStringConvertible {
  case system(String, Int32)
  case abi(ABIError)

  public var description: String {
    switch self {
    case .system(let call, let errno): return "\(call) failed: \(String(cString: strerror(errno)))"
    case .abi(let e): return e.description
    }
  }
}

/// A client's memory region attached to a device queue (ABI 1.4): a memfd
/// sealed against shrinking, mapped read-write, so the device reads and writes
/// the client's pages in place. The seal is what makes this safe: the file can
/// never become shorter than the mapping, so touching it can never SIGBUS.
public final class ExternalRegion: @unchecked Sendable {
  public let fd: Int32
  public let size: UInt64
  public let base: UnsafeMutableRawPointer

  /// Why a memfd cannot serve as an external region.
  public enum Refusal: Error, Equatable, CustomStringConvertible {
    case notSealed
    case tooSmall(actual: UInt64, claimed: UInt64)
    case badSize
    case system(String, Int32)

    public var description: String {
      switch self {
      case .notSealed: "the memfd is not sealed against shrinking (add F_SEAL_SHRINK)"
      case .tooSmall(let a, let c): "the memfd holds \(a) bytes, fewer than the \(c) claimed"
      case .badSize: "the claimed size must be between 1 byte and 16 GiB"
      case .system(let call, let e): "\(call) failed: \(String(cString: strerror(e)))"
      }
    }
  }

  /// Largest region accepted (bounds the address space one client can make the device map).
  public static let maxSize: UInt64 = 16 << 30

  /// Checks that `fd` is a shrink-sealed file of at least `claimedSize` bytes. Does not take ownership.
  public static func check(fd: Int32, claimedSize: UInt64) throws(Refusal) {
    guard claimedSize > 0 && claimedSize <= maxSize else { throw .badSize }
    guard accel_memfd_is_shrink_sealed(fd) == 1 else { throw .notSealed }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw .system("fstat", accel_errno()) }
    guard UInt64(st.st_size) >= claimedSize else { throw .tooSmall(actual: UInt64(st.st_size), claimed: claimedSize) }
  }

  /// Checks and maps `claimedSize` bytes of `fd`. Takes ownership of `fd` (closed on failure too).
  public static func map(fd: Int32, claimedSize: UInt64) throws(Refusal) -> ExternalRegion {
    do throws(Refusal) {
      try check(fd: fd, claimedSize: claimedSize)
      guard let base = accel_map_shared(fd, claimedSize) else { throw .system("mmap", accel_errno()) }
      return ExternalRegion(fd: fd, size: claimedSize, base: base)
    } catch {
      close(fd)
      throw error
    }
  }

  private init(fd: Int32, size: UInt64, base: UnsafeMutableRawPointer) {
    self.fd = fd
    self.size = size
    self.base = base
  }

  deinit {
    _ = accel_unmap(base, size)
    close(fd)
  }
}
