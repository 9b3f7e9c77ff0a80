/// An oracle of a ring game that did not hold.
struct RingFuzzFailure: Error {
  var message: String
}
