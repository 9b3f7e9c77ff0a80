import AccelScheduler
import Testing

/// Ordered chains (a stream's slices) in both schedulers, and what read-ahead
/// does to a stream's share of device time, on a fake clock.
@Suite struct JobChainTests {
  @Test func chainedJobsRunOneAtATimeInSequenceOrderWhateverTheirArrivalOrder() {
    for var s in [any JobScheduler](arrayLiteral: FairScheduler(weights: ["t": 1]), FIFOScheduler()) {
      s.chains.open(7)
      // Arrival order 1, 0: sequence 1 is queued first but must wait.
      s.enqueue(QueuedJob(id: 11, tenant: "t", cost: 10, chain: 7, sequence: 1), now: 0)
      s.enqueue(QueuedJob(id: 10, tenant: "t", cost: 10, chain: 7, sequence: 0), now: 0)
      #expect(s.peek()?.id == 10)
      #expect(s.pop(now: 0)?.id == 10)
      // Sequence 0 runs: nothing of the chain is eligible.
      #expect(s.peek() == nil)
      #expect(s.pop(now: 0) == nil)
      s.chains.admit(7, sequence: 1)
      #expect(s.pop(now: 0)?.id == 11)
      #expect(s.count == 0)
    }
  }

  @Test func aSliceThatMustContinueGoesBeforeTheQueuedNextSlice() {
    var s = FairScheduler(weights: ["t": 1])
    s.chains.open(1)
    s.enqueue(QueuedJob(id: 1, tenant: "t", cost: 10, chain: 1, sequence: 0), now: 0)
    s.enqueue(QueuedJob(id: 2, tenant: "t", cost: 10, chain: 1, sequence: 1), now: 0)
    #expect(s.pop(now: 0)?.id == 1)
    // Sequence 0 ended with more output: its continuation keeps sequence 0.
    s.chains.admit(1, sequence: 0)
    s.enqueue(QueuedJob(id: 3, tenant: "t", cost: 10, chain: 1, sequence: 0), now: 0)
    #expect(s.pop(now: 0)?.id == 3)
    s.chains.admit(1, sequence: 1)
    #expect(s.pop(now: 0)?.id == 2)
  }

  @Test func aTenantsOtherJobsPassItsWaitingSlice() {
    var s = FairScheduler(weights: ["t": 1])
    s.chains.open(1)
    s.enqueue(QueuedJob(id: 1, tenant: "t", cost: 10, chain: 1, sequence: 0), now: 0)
    s.enqueue(QueuedJob(id: 2, tenant: "t", cost: 10, chain: 1, sequence: 1), now: 0)
    s.enqueue(QueuedJob(id: 3, tenant: "t", cost: 10), now: 0)
    #expect(s.pop(now: 0)?.id == 1)
    #expect(s.pop(now: 0)?.id == 3)
    #expect(s.pop(now: 0) == nil)
  }

  @Test func blockedAndEndedChainsAdmitNothing() {
    var s = FIFOScheduler()
    s.chains.open(4)
    s.enqueue(QueuedJob(id: 1, tenant: "t", cost: 1, chain: 4, sequence: 0), now: 0)
    s.chains.block(4)
    #expect(s.peek() == nil)
    s.chains.end(4)
    #expect(!s.chains.isOpen(4))
    #expect(s.peek() == nil)
    #expect(s.remove(id: 1)?.id == 1)
    #expect(s.count == 0)
  }

  /// Two engines; "bulk" always has 4 jobs waiting; "stream" is one chain whose
  /// slices cost the same as bulk jobs. With `readAhead` the stream's next slice
  /// is queued while the current one runs; without it, the next slice arrives only
  /// after the current one completes, by which time bulk has taken the engine.
  static func streamShare(readAhead: Bool, streamWeight: UInt32, bulkWeight: UInt32) -> Double {
    var s = FairScheduler(weights: ["stream": streamWeight, "bulk": bulkWeight])
    let cost: UInt64 = 1000
    var clock: UInt64 = 0
    var id: UInt64 = 0
    var running: [(end: UInt64, job: QueuedJob)] = []
    var busy: [String: UInt64] = [:]
    var nextSlice: UInt64 = 0
    var sliceDue: UInt64? = 0  // when the stream (without read-ahead) submits its next slice
    s.chains.open(1)
    func submitSlice(_ s: inout FairScheduler) {
      id += 1
      s.enqueue(QueuedJob(id: id, tenant: "stream", cost: cost, chain: 1, sequence: nextSlice), now: clock)
      nextSlice += 1
    }
    if readAhead {
      submitSlice(&s)
      submitSlice(&s)
      sliceDue = nil
    }
    while clock < 2_000_000 {
      while s.queued(for: "bulk") < 4 {
        id += 1
        s.enqueue(QueuedJob(id: id, tenant: "bulk", cost: cost), now: clock)
      }
      if let due = sliceDue, due <= clock {
        submitSlice(&s)
        sliceDue = nil
      }
      while running.count < 2, let job = s.pop(now: clock) { running.append((clock + cost, job)) }
      let soonest = running.min { $0.end < $1.end }!
      clock = soonest.end
      // Engines that finish together complete in dispatch order.
      for done in running.filter({ $0.end == clock }) {
        running.removeAll { $0.job.id == done.job.id }
        busy[done.job.tenant, default: 0] += cost
        s.complete(done.job, actualCost: cost, now: clock)
        if done.job.chain != 0 {
          s.chains.admit(1, sequence: done.job.sequence + 1)
          // The stream's handler wakes up a little after the completion.
          if readAhead { submitSlice(&s) } else { sliceDue = clock + 1 }
        }
      }
    }
    return Double(busy["stream"]!) / Double(busy.values.reduce(0, +))
  }

  @Test func readAheadLetsAStreamTakeItsFairShare() {
    // Equal weights: half the device, which is one whole engine (all a serial stream can use).
    #expect(abs(Self.streamShare(readAhead: true, streamWeight: 1, bulkWeight: 1) - 0.5) < 0.01)
    // Weight 1 against 3: a quarter.
    #expect(abs(Self.streamShare(readAhead: true, streamWeight: 1, bulkWeight: 3) - 0.25) < 0.01)
  }

  @Test func withoutReadAheadAStreamFallsShortOfItsShare() {
    // The slice arrives just after bulk has refilled the engine, so the stream
    // waits for one of two engines to finish a bulk job: one third, not one half.
    let share = Self.streamShare(readAhead: false, streamWeight: 1, bulkWeight: 1)
    #expect(share < 0.4)
  }
}
