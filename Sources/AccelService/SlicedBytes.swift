/// A message as the transport holds it: its bytes in one or more slices, in
/// order, read in place. The network lane finds the payload field across the
/// slices (`ProtoWire.scan` reads only tags and lengths) and copies each
/// field's bytes once, to where they go, so a message that arrived in several
/// slices is never gathered into one buffer first.
///
/// The slices must stay valid while it is used (the C core keeps a call's
/// message for the call's life).
struct SlicedBytes {
  let slices: [UnsafeRawBufferPointer]
  /// Offset of each slice's first byte in the message.
  private let starts: [Int]
  /// Bytes in all slices.
  let count: Int

  init(_ slices: [UnsafeRawBufferPointer]) {
    var starts: [Int] = []
    starts.reserveCapacity(slices.count)
    var total = 0
    var kept: [UnsafeRawBufferPointer] = []
    kept.reserveCapacity(slices.count)
    for s in slices where s.count > 0 {
      starts.append(total)
      kept.append(s)
      total += s.count
    }
    self.slices = kept
    self.starts = starts
    self.count = total
  }

  init(_ bytes: UnsafeRawBufferPointer) { self.init([bytes]) }

  /// The slice holding byte `i` (`0 <= i < count`).
  private func slice(holding i: Int) -> Int {
    var (lo, hi) = (0, starts.count - 1)
    while lo < hi {
      let mid = (lo + hi + 1) / 2
      if starts[mid] <= i { lo = mid } else { hi = mid - 1 }
    }
    return lo
  }

  subscript(i: Int) -> UInt8 {
    let s = slice(holding: i)
    return slices[s][i - starts[s]]
  }

  /// Calls `body` with each contiguous piece of `range`, in order.
  func forEachPiece(of range: Range<Int>, _ body: (UnsafeRawBufferPointer) -> Void) {
    guard !range.isEmpty else { return }
    var s = slice(holding: range.lowerBound)
    var at = range.lowerBound
    while at < range.upperBound {
      let slice = slices[s]
      let from = at - starts[s]
      let n = min(slice.count - from, range.upperBound - at)
      body(UnsafeRawBufferPointer(rebasing: slice[from..<(from + n)]))
      at += n
      s += 1
    }
  }

  /// Copies `range` to `destination` (which has room for it).
  func copy(_ range: Range<Int>, to destination: UnsafeMutableRawBufferPointer) {
    var offset = 0
    forEachPiece(of: range) { piece in
      UnsafeMutableRawBufferPointer(rebasing: destination[offset..<(offset + piece.count)]).copyMemory(from: piece)
      offset += piece.count
    }
  }

  /// Appends `range`'s bytes to `array`.
  func append(_ range: Range<Int>, to array: inout [UInt8]) {
    forEachPiece(of: range) { array.append(contentsOf: $0) }
  }
}

extension SlicedBytes: ProtoWire.Bytes {}
extension UnsafeRawBufferPointer: ProtoWire.Bytes {}
