internal import AccelABI
internal import AccelDevice
internal import AccelDispatcher
internal import AccelDriver
internal import AccelScheduler
internal import AccelRequests
internal import AccelMessages
internal import CAccelABI

/// Builds the DescribeDevice answer from the device, the driver and the configuration.
enum DeviceDescription {
  static func make(dispatcher: Dispatcher, device: EmulatedDevice?, configuration: ServiceConfiguration)
    -> Accelgate_V1_DescribeDeviceResponse
  {
    var r = Accelgate_V1_DescribeDeviceResponse()
    let snapshot = dispatcher.snapshot
    r.device.name = "accelgate-emulated"
    r.device.mode = device == nil ? "external" : "embedded"
    r.device.abiVersion = "\(ACCEL_ABI_VERSION_MAJOR).\(ACCEL_ABI_VERSION_MINOR)"
    let queues = dispatcher.driver.queues
    r.device.healthy = dispatcher.isAttached && (device?.isRunning ?? true) && queues.allSatisfy(\.isHealthy)
    r.device.degraded = dispatcher.degraded != nil
    r.device.statusDetail =
      dispatcher.detachedReason ?? dispatcher.degraded
      ?? (device?.isIsolated == true ? "device isolated after repeated queue errors" : nil)
      ?? queues.compactMap { $0.service.reason }.first ?? ""
    r.device.isolated = device?.isIsolated ?? false
    r.device.verifyCompression = configuration.verifyCompression
    r.device.retriedJobs = snapshot.retried
    r.device.faultInjection = device?.faults.description ?? "none"
    for q in queues {
      var qi = Accelgate_V1_QueueInfo()
      let h = q.region.header.pointee
      qi.id = h.queue_id
      qi.sqEntries = h.sq_entries
      qi.cqEntries = h.cq_entries
      qi.dataPoolBytes = h.data_size
      qi.weight = h.weight
      qi.inFlight = UInt32(snapshot.inFlight[q.index])
      qi.state = queueState(flags: h.state_flags, healthy: q.isHealthy)
      let stats = q.statistics
      qi.completed = stats.completed
      qi.recovery = q.service.reason ?? ""
      qi.resets = stats.resets
      qi.invalidCompletions = stats.invalidCompletions
      qi.stalls = stats.stalls
      r.queues.append(qi)
    }
    for e in device?.engines ?? [] {
      var ei = Accelgate_V1_EngineInfo()
      ei.id = UInt32(e.id)
      ei.jobs = e.jobCount
      ei.busyNs = e.busyTime
      ei.throughputCapMbps = device?.configuration.engineThroughputCapMBps ?? 0
      r.engines.append(ei)
    }
    for format in [Accelgate_V1_CompressionFormat.deflate, .zlib, .gzip, .zstd, .lz4] {
      let algorithm = (try? JobTranslator.algorithm(format)) ?? .gzip
      let (range, fallback) = JobTranslator.levels(algorithm)
      var c = Accelgate_V1_Capability()
      c.operation = .compress
      c.format = format
      c.minLevel = range.lowerBound
      c.maxLevel = range.upperBound
      c.defaultLevel = fallback
      c.engines =
        switch format {
        case .zstd: "zstd"
        case .lz4: "lz4(0-2) lz4hc(3-12)"
        default: "zlib(0) isal-igzip(1-3) libdeflate(4-9)"
        }
      r.capabilities.append(c)
      var d = Accelgate_V1_Capability()
      d.operation = .decompress
      d.format = format
      d.engines = JobTranslator.engineName(.decompress, algorithm, level: 0)
      r.capabilities.append(d)
    }
    for cipher in [Accelgate_V1_CipherAlgorithm.aes128Gcm, .aes256Gcm, .chacha20Poly1305] {
      for op in [Accelgate_V1_Operation.encrypt, .decrypt] {
        var c = Accelgate_V1_Capability()
        c.operation = op
        c.cipher = cipher
        c.engines = "openssl-evp"
        r.capabilities.append(c)
      }
    }
    for digest in [
      Accelgate_V1_DigestAlgorithm.sha256, .sha384, .sha512, .hmacSha256, .hmacSha512, .crc32C, .crc32, .adler32,
    ] {
      var c = Accelgate_V1_Capability()
      c.operation = .digest
      c.digest = digest
      c.engines =
        switch digest {
        case .crc32C, .crc32: "isal-crc"
        case .adler32: "zlib"
        default: "openssl-evp"
        }
      r.capabilities.append(c)
    }
    r.limits.maxRequestBytes = UInt64(configuration.maxRequestBytes)
    r.limits.maxResponseBytes = max(
      BufferSizing.compressBound(UInt64(configuration.maxRequestBytes)), UInt64(configuration.maxDecompressedBytes))
    r.limits.maxDecompressedBytes = UInt64(configuration.maxDecompressedBytes)
    r.limits.maxQueuedJobs = UInt32(configuration.maxQueuedJobs)
    r.limits.inFlightPerQueue = UInt32(configuration.inFlightPerQueue)
    r.limits.maxBatch = UInt32(configuration.maxBatch)
    r.limits.scheduler = configuration.scheduler.rawValue
    let budget = configuration.inFlightBudget.components
    r.limits.inFlightBudgetUs = UInt64(max(0, budget.seconds * 1_000_000 + budget.attoseconds / 1_000_000_000_000))
    let (seconds, attoseconds) = configuration.defaultDeadline.components
    r.limits.defaultDeadlineMs = UInt64(max(0, seconds * 1000 + attoseconds / 1_000_000_000_000_000))
    return r
  }

  static func queueState(flags: UInt32, healthy: Bool) -> String {
    if flags & ACCEL_QF_ISOLATED != 0 { return "isolated" }
    if flags & ACCEL_QF_STOPPED != 0 { return "stopped" }
    if flags & ACCEL_QF_ERROR != 0 || !healthy { return "error" }
    return "running"
  }
}
