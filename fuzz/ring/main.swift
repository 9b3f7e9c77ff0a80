// accelringfuzz: ring-level games on the real shared memory (issue 17, part 2).
//
//   accelringfuzz hostile-driver [--seconds S] [--seed N]
//       A hostile peer writes random descriptors, chains and AEAD parameter blocks
//       into its queue while a second thread flips shared words (indices, aad_length,
//       key-slot bytes, cq_head). An honest queue on the same one-engine device must
//       be served throughout, and the device must stop cleanly afterwards.
//   accelringfuzz hostile-device [--seconds S] [--seed N]
//       A hostile device answers the driver with forged, duplicated, oversized and
//       late completions and plays index games. Every job completes at most once,
//       only with a completion that names it exactly, and the driver never crashes.
//
// Exit status 0 when every oracle held, 1 with a message when one broke; a crash
// (signal) is a finding too. The seed is printed first so any run can be replayed.
import Foundation

let arguments = CommandLine.arguments.dropFirst()
var seconds = 20.0
var seed = UInt64(UInt32.random(in: 1...UInt32.max))
var game: String?
var iterator = arguments.makeIterator()
while let argument = iterator.next() {
  switch argument {
  case "--seconds": seconds = iterator.next().flatMap(Double.init) ?? seconds
  case "--seed": seed = iterator.next().flatMap { UInt64($0) } ?? seed
  case "hostile-driver", "hostile-device": game = argument
  default:
    FileHandle.standardError.write(Data("accelringfuzz: unknown argument \(argument)\n".utf8))
    exit(2)
  }
}
print("accelringfuzz \(game ?? "?") seed=\(seed) seconds=\(seconds)")
let outcome: Result<String, RingFuzzFailure>
switch game {
case "hostile-driver": outcome = HostileDriverGame(seed: seed, seconds: seconds).run()
case "hostile-device": outcome = HostileDeviceGame(seed: seed, seconds: seconds).run()
default:
  FileHandle.standardError.write(Data("usage: accelringfuzz hostile-driver|hostile-device [--seconds S] [--seed N]\n".utf8))
  exit(2)
}
switch outcome {
case .success(let summary):
  print("ok: \(summary)")
case .failure(let failure):
  print("FINDING (seed \(seed)): \(failure.message)")
  exit(1)
}
