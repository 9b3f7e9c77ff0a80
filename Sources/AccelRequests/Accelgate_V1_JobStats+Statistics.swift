package import AccelDispatcher
package import AccelMessages

extension Accelgate_V1_JobStats {
  /// The API's view of a job's statistics.
  package init(_ s: JobStatistics, engine: String) {
    self.init()
    queueWaitNs = s.queueWaitNanoseconds
    deviceNs = s.deviceNanoseconds
    totalNs = s.totalNanoseconds
    inputBytes = s.inputBytes
    outputBytes = s.outputBytes
    queueID = s.queueID
    engineID = s.engineID
    batchSize = s.batchSize
    self.engine = engine
  }
}
