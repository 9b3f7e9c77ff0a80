/// SplitMix64: a small seeded generator, so a failing run is replayed with `--seed`.
struct SeededRandom: RandomNumberGenerator {
  private var state: UInt64
  init(seed: UInt64) { state = seed }

  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }

  /// One of `values`, or a uniform number below `bound` one time in `wildOdds`.
  mutating func edge<T: FixedWidthInteger>(_ values: [T], wild bound: T, wildOdds: Int = 4) -> T {
    if Int.random(in: 0..<wildOdds, using: &self) == 0 { return T.random(in: 0...bound, using: &self) }
    return values.randomElement(using: &self) ?? 0
  }
}
