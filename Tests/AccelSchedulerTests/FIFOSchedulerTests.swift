import AccelScheduler
import Testing

@Suite struct FIFOSchedulerTests {
  @Test func popsInArrivalOrderAndSkipsRemoved() {
    var s = FIFOScheduler()
    for i in 1...5 { s.enqueue(QueuedJob(id: UInt64(i), tenant: "t\(i % 2)", cost: 10), now: UInt64(i)) }
    #expect(s.count == 5)
    #expect(s.remove(id: 2)?.id == 2)
    #expect(s.remove(id: 2) == nil)
    #expect(s.peek()?.id == 1)
    #expect(s.pop(now: 10)?.id == 1)
    #expect(s.remove(id: 3)?.id == 3)
    #expect(s.peek()?.id == 4)
    #expect(s.pop(now: 11)?.id == 4)
    #expect(s.pop(now: 12)?.id == 5)
    #expect(s.pop(now: 13) == nil)
    #expect(s.count == 0)
  }

  @Test func memoryStaysBoundedUnderChurn() {
    var s = FIFOScheduler()
    var next: UInt64 = 0
    for _ in 0..<10_000 {
      s.enqueue(QueuedJob(id: next, tenant: "a", cost: 1), now: next)
      next += 1
      s.enqueue(QueuedJob(id: next, tenant: "a", cost: 1), now: next)
      _ = s.remove(id: next)
      next += 1
      #expect(s.pop(now: next) != nil)
    }
    #expect(s.count == 0)
    #expect(s.peek() == nil)
  }
}
