package import AccelABI
package import AccelDriver
package import FoundationEssentials
internal import Synchronization

/// Where a job's input lies.
package enum JobInput: Sendable {
  /// In the gateway's memory: copied into a queue's pool when the job is placed.
  case inline(Data)
  /// Network lane: already in a queue's pool, where the edge decoded it
  /// (`Dispatcher.stageInput`); the job runs on that queue, and is copied out
  /// only if that queue cannot take it. The first `skip` bytes are not the
  /// job's input (a named key's envelope header and nonce before the ciphertext).
  case staged(StagedInput, skip: Int)
  /// Local lane (ABI 1.4): in a client's memory attached to every queue.
  case span(ExternalSpan)
}

/// Where a job's output goes.
package enum JobOutput: Sendable {
  /// Copied out of the pool into `JobResult.output`.
  case copied
  /// Network lane: left in the pool and handed to the caller as
  /// `JobResult.pooledOutput` (the caller sends it from there). Stream chunks
  /// and failed jobs are copied regardless.
  case pooled
  /// Local lane: written by the device into a client's memory;
  /// `JobResult.output` is empty and `stats.outputBytes` says how much.
  case span(ExternalSpan)
}

extension JobOutput {
  var isPooled: Bool { if case .pooled = self { true } else { false } }
}

/// One job as the service hands it to the dispatcher.
package struct JobRequest: Sendable {
  /// One step, or two run as a descriptor chain on the device.
  package var steps: [DeviceStep]
  package var input: JobInput
  package var output: JobOutput = .copied
  /// Parameter block for AEAD steps (see `AEADParameters`), empty otherwise.
  package var aux: [UInt8] = []
  /// Key for keyed steps, copied into a device key slot and zeroed there after the job.
  package var key: SecretBytes? = nil
  /// Capacity of the intermediate buffer of a two-step chain: at least one byte
  /// for a chain (its first step may produce nothing, e.g. an empty plaintext
  /// before decompress-after, and the device still needs a real buffer between
  /// the steps); always 0 for a single step.
  package var midCapacity: Int {
    get { steps.count > 1 ? max(1, requestedMidCapacity) : 0 }
    set { requestedMidCapacity = newValue }
  }
  private var requestedMidCapacity = 0
  /// Whether the job's buffers carry secrets or plaintext (zeroed on release).
  package var sensitive = false
  /// Payload size counted against the tenant's limits, when it differs from the
  /// input (a ciphertext counts without the tag and envelope it carries).
  package var admissionBytes: Int? = nil
  /// A chunk of an open stream: it must run on the stream's queue, is never
  /// retried elsewhere, and may end with `moreOutput`.
  package var stream: StreamTarget? = nil
  /// The slice's place in its stream. Slices may be queued ahead (read-ahead);
  /// the dispatcher runs them one at a time in this order (see `JobChains`).
  /// A slice that ended with `moreOutput` is continued under the same number.
  package var streamSequence: UInt64 = 0
  /// Kept alive as long as the job is, including after its caller has gone
  /// while the device still runs it (the local lane's hold on client memory).
  package var retain: (any AnyObject & Sendable)? = nil

  /// Payload bytes of the job's input when it is inline or staged (0 for a local-lane span):
  /// what the job holds of the gateway's memory.
  package var payloadCount: Int {
    switch input {
    case .inline(let data): data.count
    case .staged(let staged, let skip): staged.length - skip
    case .span: 0
    }
  }
  /// Bytes the device reads for the job, wherever they lie: the span's length for
  /// a local-lane job. Device time is estimated and learned from this, so a span
  /// job is costed like the same bytes sent inline (issue 17, finding 7).
  package var deviceInputBytes: Int { inputSpan.map { Int($0.length) } ?? payloadCount }
  /// Bytes admission charges for the job.
  package var chargedBytes: Int { admissionBytes ?? payloadCount }
  /// Bytes reserved in the pool for the result; the device never writes more.
  package var outputCapacity: Int
  package var tenant: String
  /// Absolute deadline; nil applies the dispatcher's default.
  package var deadline: ContinuousClock.Instant?

  package init(
    opcode: DeviceOpcode, algorithm: DeviceAlgorithm, level: UInt8 = 0, input: Data, outputCapacity: Int,
    tenant: String = "default", deadline: ContinuousClock.Instant? = nil
  ) {
    self.steps = [DeviceStep(opcode, algorithm, level: level)]
    self.input = .inline(input)
    self.outputCapacity = outputCapacity
    self.tenant = tenant
    self.deadline = deadline
  }
}

extension JobRequest {
  /// The inline input's bytes (empty for a staged or span input).
  package var inlineInput: Data {
    if case .inline(let data) = input { data } else { Data() }
  }
  /// The staged payload, when the input lies in a pool already.
  package var stagedInput: StagedInput? {
    if case .staged(let staged, _) = input { staged } else { nil }
  }
  /// Leading bytes of the staged payload that are not the input.
  package var stagedSkip: Int {
    if case .staged(_, let skip) = input { skip } else { 0 }
  }
  package var inputSpan: ExternalSpan? {
    if case .span(let span) = input { span } else { nil }
  }
  package var outputSpan: ExternalSpan? {
    if case .span(let span) = output { span } else { nil }
  }

  package var opcode: DeviceOpcode { steps[0].opcode }
  package var algorithm: DeviceAlgorithm { steps[0].algorithm }
  package var level: UInt8 { steps[0].level }

  package init(
    steps: [DeviceStep], input: Data, outputCapacity: Int, tenant: String, aux: [UInt8] = [], key: SecretBytes? = nil,
    midCapacity: Int = 0, sensitive: Bool = false
  ) {
    self.init(opcode: steps[0].opcode, algorithm: steps[0].algorithm, input: input, outputCapacity: outputCapacity, tenant: tenant)
    self.steps = steps
    self.aux = aux
    self.key = key
    self.midCapacity = midCapacity
    self.sensitive = sensitive
  }
}

/// A finished job: its output and what it cost.
package struct JobResult: Sendable {
  /// The output, copied out of the pool; empty when `pooledOutput` holds it.
  package var output: Data
  package var stats: JobStatistics
  /// Set instead of `output` for jobs that asked for `poolOutput`.
  package var pooledOutput: PooledOutput? = nil
  /// Stream chunks: the output filled up before the chunk was done; submit the
  /// input from `consumed` on (possibly none) to get the rest.
  package var moreOutput = false
  package var consumed = 0
}

/// Where a stream lives: its queue (by the driver's index) and context slot.
package struct StreamTarget: Sendable, Equatable {
  package var queueIndex: Int
  package var slot: UInt32
  /// The driver the stream was opened on (a replaced driver ends the stream).
  package var driverID: ObjectIdentifier
  /// The scheduler chain that orders the stream's slices.
  package var chain: UInt64
  /// The tenant that holds the stream, and the memory its context is counted at
  /// in the gateway's memory budget (`StreamContextMemory`).
  package var tenant: String = "default"
  package var contextBytes: Int = 0
}

package struct JobStatistics: Sendable, Equatable {
  package var queueWaitNanoseconds: UInt64 = 0
  package var deviceNanoseconds: UInt64 = 0
  package var totalNanoseconds: UInt64 = 0
  package var inputBytes: UInt64 = 0
  package var outputBytes: UInt64 = 0
  package var queueID: UInt32 = 0
  package var engineID: UInt32 = 0
  package var batchSize: UInt32 = 0
  /// Copies of the payload the dispatcher made into the pool (0 for a staged
  /// or local-lane input; 1 normally; more after a retry or an unstaging).
  package var inputCopies: UInt32 = 0
  /// Copies of the result the dispatcher made out of the pool (0 when it was
  /// handed over as `pooledOutput` or written to a local-lane span).
  package var outputCopies: UInt32 = 0
}

/// A completed job's output, still in its queue's pool: the caller writes it
/// out from there (network lane) and the lease (slot and every buffer) is
/// released afterwards, exactly once: by `release()`, or when the last
/// reference goes. Thread-safe.
package final class PooledOutput: Sendable {
  private let queue: DriverQueue
  private let lease: Lease
  /// Bytes of output.
  package let count: Int
  private let released = Atomic<Bool>(false)
  private let afterRelease: @Sendable () -> Void

  package init(queue: DriverQueue, lease: Lease, count: Int, afterRelease: @escaping @Sendable () -> Void) {
    self.queue = queue
    self.lease = lease
    self.count = count
    self.afterRelease = afterRelease
  }

  deinit { release() }

  /// Whether the output is still readable.
  package var isReleased: Bool { released.load(ordering: .acquiring) }

  /// Reads the output in place. Must not be called after `release()`.
  package func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
    precondition(!isReleased, "pooled output read after release")
    return try body(queue.output(lease, count: count))
  }

  /// The output in place, for a sender that holds the bytes past this call
  /// (the C core sends them without a copy): valid until `release()`, which
  /// that sender must call once it is done with them. Empty once released.
  package var bytesUntilRelease: UnsafeRawBufferPointer {
    isReleased ? UnsafeRawBufferPointer(start: nil, count: 0) : queue.output(lease, count: count)
  }

  /// Frees the lease (slot and buffers; zeroed first for sensitive jobs). Idempotent.
  package func release() {
    guard !released.exchange(true, ordering: .acquiringAndReleasing) else { return }
    queue.release(lease)
    afterRelease()
  }
}

/// Why a job did not produce a result. The service maps each case to one gRPC status
/// (see `docs/STATUS.md`); nothing below the service knows about gRPC.
package enum JobError: Error, Equatable, Sendable {
  /// Admission refused the job; the caller may retry after the hint.
  case rejected(reason: RejectionReason, retryAfterMilliseconds: UInt64)
  /// The payload can never fit the device's buffers.
  case tooLarge(needed: UInt64, limit: UInt64)
  /// The payload is over the tenant's single-payload limit.
  case payloadOverTenantLimit(size: Int, limit: Int)
  /// The deadline passed before the job completed.
  case deadlineExceeded
  /// The caller went away.
  case cancelled
  /// The device ran the job and reported a job-class error.
  case device(DeviceStatus)
  /// The device could not run the job (queue error, device down).
  case unavailable(String)
  /// The dispatcher is shutting down.
  case shuttingDown
}

extension JobError {
  /// A short, bounded name for metrics labels.
  package var kind: String {
    switch self {
    case .rejected(let reason, _): "rejected_\(reason.rawValue)"
    case .tooLarge: "too_large"
    case .payloadOverTenantLimit: "payload_over_limit"
    case .deadlineExceeded: "deadline_exceeded"
    case .cancelled: "cancelled"
    case .device: "job_error"
    case .unavailable: "unavailable"
    case .shuttingDown: "shutting_down"
    }
  }
}

package enum RejectionReason: String, Sendable {
  /// The gateway-wide wait queue is full.
  case queueFull = "queue_full"
  /// The tenant has its maximum number of jobs waiting.
  case tenantQueueFull = "tenant_queue_full"
  /// The tenant has its maximum payload bytes waiting.
  case tenantQueuedBytes = "tenant_queued_bytes"
  /// The tenant is over its byte-rate cap.
  case rateLimited = "rate_limited"
  /// All waiting jobs together hold the gateway's payload memory budget.
  case gatewayMemory = "gateway_memory"
  /// The tenant holds its maximum number of open streams.
  case tenantStreams = "tenant_streams"
}
