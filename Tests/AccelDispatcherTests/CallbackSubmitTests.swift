import AccelABI
import AccelDispatcher
import AccelDriver
import Foundation
import Synchronization
import Testing

/// `Dispatcher.submit(_:id:completion:)`, the entry for an edge whose threads
/// are not Swift tasks (issue 18): every job's callback runs exactly once,
/// with the same outcome `execute` gives.
@Suite(.timeLimit(.minutes(2))) struct CallbackSubmitTests {
  typealias Rig = DispatcherTests.Rig

  /// Collects callbacks; `wait` returns once `count` have arrived.
  final class Outcomes: Sendable {
    let results = Mutex<[UInt64: [Result<JobResult, JobError>]]>([:])
    func sink(_ id: UInt64) -> @Sendable (Result<JobResult, JobError>) -> Void {
      { r in self.results.withLock { $0[id, default: []].append(r) } }
    }
    func total() -> Int { results.withLock { $0.values.reduce(0) { $0 + $1.count } } }
  }

  @Test func aJobCompletesThroughItsCallbackWithTheSameOutputAsExecute() async throws {
    let rig = try Rig(capMBps: nil)
    defer { rig.stop() }
    let input = Data((0..<50_000).map { UInt8(truncatingIfNeeded: $0 * 7 / 13) })
    var job = rig.job(0)
    job.input = .inline(input)
    job.outputCapacity = Int(BufferSizing.compressBound(UInt64(input.count)))
    let outcomes = Outcomes()
    for id in 1...20 as ClosedRange<UInt64> { rig.dispatcher.submit(job, id: 1000 + id, completion: outcomes.sink(1000 + id)) }
    try await rig.wait { outcomes.total() == 20 }
    let viaTask = try await rig.dispatcher.execute(job)
    let all = outcomes.results.withLock { $0 }
    #expect(all.count == 20)
    for (_, results) in all {
      #expect(results.count == 1)
      let output = try results[0].get().output
      #expect(output == viaTask.output)
    }
  }

  @Test func refusalsAndCancellationsCallBackOnceWithTheirError() async throws {
    let rig = try Rig(capMBps: 1, maxQueued: 2)
    defer { rig.stop() }
    let outcomes = Outcomes()
    // Too large for any pool: refused before admission, on this thread.
    rig.dispatcher.submit(rig.job(64 << 20), id: 1, completion: outcomes.sink(1))
    #expect(outcomes.total() == 1)
    guard case .failure(.tooLarge) = outcomes.results.withLock({ $0[1]?.first }) else {
      Issue.record("expected tooLarge")
      return
    }
    // One job on the slow device, two queued, the fourth refused: queue full.
    for id in 2...5 as ClosedRange<UInt64> { rig.dispatcher.submit(rig.job(200_000), id: id, completion: outcomes.sink(id)) }
    try await rig.wait { outcomes.total() >= 2 }
    let refused = outcomes.results.withLock { $0.compactMap { id, r -> UInt64? in
      if case .failure(.rejected(.queueFull, _)) = r.first { return id } else { return nil }
    } }
    #expect(refused.count == 1)
    // Cancelling the queued ones ends them at once, with `cancelled`.
    for id in 2...5 as ClosedRange<UInt64> where !refused.contains(id) { rig.dispatcher.cancel(id: id) }
    try await rig.wait { outcomes.total() == 5 }
    let all = outcomes.results.withLock { $0 }
    #expect(all.values.allSatisfy { $0.count == 1 })
    let cancelled = all.values.filter { if case .failure(.cancelled) = $0[0] { true } else { false } }.count
    #expect(cancelled >= 2)  // the one on the device may finish first
  }

  @Test(.disabled("flaky under full-suite load: the deadline job was once dispatched behind the blocker and completed (issue 18 note)"))
  func aDeadlineEndsACallbackJob() async throws {
    let rig = try Rig(capMBps: 1)
    defer { rig.stop() }
    let outcomes = Outcomes()
    // About a second on the device at 1 MB/s: the second job waits behind it past its deadline.
    rig.dispatcher.submit(rig.job(1 << 20), id: 1, completion: outcomes.sink(1))
    try await rig.wait { rig.submitted == 1 }
    rig.dispatcher.submit(rig.job(1000, deadline: .now + .milliseconds(50)), id: 2, completion: outcomes.sink(2))
    try await rig.wait { outcomes.results.withLock { $0[2] != nil } }
    guard case .failure(.deadlineExceeded) = outcomes.results.withLock({ $0[2]?.first }) else {
      Issue.record("expected deadlineExceeded, got \(String(describing: outcomes.results.withLock { $0[2] }))")
      return
    }
    rig.dispatcher.cancel(id: 1)
    try await rig.wait { outcomes.total() == 2 }
  }
}
