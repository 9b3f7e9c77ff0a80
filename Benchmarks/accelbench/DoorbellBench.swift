import AccelABI
import AccelDevice
import AccelDriver
import ArgumentParser
import Foundation
import Glibc
import Synchronization

/// Driver-layer ring benchmark: tiny jobs (NOP, or CRC-32C of 64 B) in a batch
/// loop against the device, adaptive doorbells against an eventfd per job.
///
/// `--jobs N --only MODE --skip-idle` runs a fixed number of jobs in one mode,
/// for `scripts/bench.sh` to count the process's syscalls with `strace -f -c`.
struct DoorbellBench: AsyncParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "doorbell", abstract: "Descriptors/s, latency, syscalls per job and idle CPU at the driver layer.")
  @Option var seconds: Double = 3
  @Option(help: "Descriptors kept in flight.") var depth = 64
  @Option(help: "Descriptors per doorbell.") var batch = 16
  @Option var json = ".build-bench/doorbell.json"
  @Option(help: "Run exactly this many jobs per mode instead of --seconds.") var jobs: Int?
  @Option(help: "Only this mode: adaptive or eventfd-per-job.") var only: String?
  @Option(help: "Only this opcode: nop or crc32c-64B.") var opcode: String?
  @Flag(help: "Skip the idle-CPU second.") var skipIdle = false

  struct Row: Codable {
    var mode: String
    var opcode: String
    var descriptorsPerSecond: Double
    var p50Microseconds: Double
    var p99Microseconds: Double
    var wakeSyscallsPerJob: Double
    var engineParksPerJob: Double
    var idleCPUPercent: Double
  }

  func run() throws {
    var rows: [Row] = []
    for mode in ["adaptive", "eventfd-per-job"] where only == nil || only == mode {
      for op in ["nop", "crc32c-64B"] where opcode == nil || opcode == op {
        let r = try measure(eventfd: mode != "adaptive", digest: op != "nop")
        rows.append(r)
        print(
          String(
            format: "%-16@ %-11@ %10.0f desc/s  p50 %6.1f us  p99 %7.1f us  wakes/job %.4f  parks/job %.4f  idle CPU %.2f%%",
            r.mode, r.opcode, r.descriptorsPerSecond, r.p50Microseconds, r.p99Microseconds, r.wakeSyscallsPerJob,
            r.engineParksPerJob, r.idleCPUPercent))
      }
    }
    try write(rows, to: json)
  }

  func measure(eventfd: Bool, digest: Bool) throws -> Row {
    let device = try EmulatedDevice(
      configuration: .defaults {
        $0.queueCount = 1
        $0.engineCount = 1
        $0.sqEntries = 256
        $0.dataPoolBytes = 4 << 20
        $0.eventfdDoorbells = eventfd
      })
    device.start()
    defer { device.stop() }
    let q = DriverQueue(
      index: 0, region: try QueueRegion.attach(fd: device.exportQueue(0)),
      perJobDoorbell: eventfd ? device.doorbellEventFD(0) : nil)
    let step = digest ? DeviceStep(.digest, .crc32c) : DeviceStep(.nop, .none)
    // Handlers run on this thread (it reaps the ring itself), so the harness
    // keeps its bookkeeping in plain preallocated arrays: no locks, no hashing.
    let book = Bookkeeping(depth: depth)
    let done = Atomic<Int>(0)
    var leases: [Int: Lease] = [:]
    var free = Array(0..<depth)
    // One lease per in-flight slot, re-armed after each completion: the loop
    // measures the ring and the doorbell, not the buffer allocator.
    var handlers: [CompletionHandler] = []
    for i in 0..<depth {
      let handler: CompletionHandler = { _ in
        book.completed(slot: i, at: SharedMemory.nowNanoseconds())
        done.add(1, ordering: .relaxed)
      }
      handlers.append(handler)
      guard let l = q.reserve(srcLength: digest ? 64 : 0, dstCapacity: digest ? 4 : 0, handler: handler) else {
        throw ValidationError("no room")
      }
      leases[i] = l
    }
    let parks0 = device.engines[0].parkCount
    let wakes0 = q.statistics.doorbellWakes
    let start = SharedMemory.nowNanoseconds()
    let end = start + UInt64(seconds * 1e9)
    let limit = jobs ?? .max
    var sent = 0
    while jobs != nil ? sent < limit : SharedMemory.nowNanoseconds() < end {
      // Submit up to `batch` descriptors behind one tail store.
      var chunk: [(lease: Lease, steps: [DeviceStep])] = []
      while chunk.count < batch && sent + chunk.count < limit, let i = free.popLast() {
        book.submittedAt[i] = SharedMemory.nowNanoseconds()
        chunk.append((leases[i]!, [step]))
      }
      if !chunk.isEmpty {
        q.submit(chunk)
        sent += chunk.count
      }
      // Reap on this thread (no reaper: the loop measures the ring itself).
      q.reap()
      for i in book.takeCompleted() {
        q.rearm(leases[i]!, handler: handlers[i])
        free.append(i)
      }
    }
    while done.load(ordering: .relaxed) < sent { q.reap(); SharedMemory.cpuRelax() }
    let elapsed = Double(SharedMemory.nowNanoseconds() - start) / 1e9
    let jobs = Double(max(1, done.load(ordering: .relaxed)))
    let parks = Double(device.engines[0].parkCount - parks0)
    let wakes = Double(q.statistics.doorbellWakes - wakes0)
    // Idle: one second with nothing to do; the engine spins briefly, then parks.
    var before = rusage()
    getrusage(RUSAGE_SELF.rawValue, &before)
    if !skipIdle { Thread.sleep(forTimeInterval: 1.0) }
    var after = rusage()
    getrusage(RUSAGE_SELF.rawValue, &after)
    func us(_ t: timeval) -> Double { Double(t.tv_sec) * 1e6 + Double(t.tv_usec) }
    let cpu = (us(after.ru_utime) + us(after.ru_stime)) - (us(before.ru_utime) + us(before.ru_stime))
    let lat = book.latencies.map { Double($0) / 1000 }
    return Row(
      mode: eventfd ? "eventfd-per-job" : "adaptive", opcode: digest ? "crc32c-64B" : "nop",
      descriptorsPerSecond: jobs / elapsed, p50Microseconds: percentile(lat, 0.5), p99Microseconds: percentile(lat, 0.99),
      wakeSyscallsPerJob: wakes / jobs, engineParksPerJob: parks / jobs, idleCPUPercent: cpu / 1e6 * 100)
  }
}

/// The doorbell loop's bookkeeping. Only the benchmark thread touches it (it both
/// submits and reaps), hence `@unchecked Sendable` without locks.
final class Bookkeeping: @unchecked Sendable {
  var submittedAt: [UInt64]
  var latencies: [UInt64] = []
  private var done: [Int] = []

  init(depth: Int) {
    submittedAt = Array(repeating: 0, count: depth)
    latencies.reserveCapacity(8 << 20)
    done.reserveCapacity(depth)
  }

  func completed(slot: Int, at now: UInt64) {
    latencies.append(now &- submittedAt[slot])
    done.append(slot)
  }

  func takeCompleted() -> [Int] {
    defer { done.removeAll(keepingCapacity: true) }
    return done
  }
}
