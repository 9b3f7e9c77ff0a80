internal import Synchronization

/// Waits for an operation, or for a timer, whichever ends first.
///
/// The operation runs in a task of its own, so a wait that never ends by itself
/// (a write into a shut HTTP/2 window, a read from a silent client) cannot hold
/// the caller past `timeout`. When the timer wins, or the caller is cancelled,
/// the operation is cancelled and not waited for.
enum TimeLimit {
  static func run<T: Sendable>(
    _ timeout: Duration, expired: @escaping @Sendable () -> any Error,
    _ operation: @escaping @Sendable () async throws -> T
  ) async throws -> T {
    let race = Race<T>()
    return try await withTaskCancellationHandler {
      try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
        race.begin(continuation)
        let work = Task {
          let outcome: Result<T, any Error>
          do { outcome = .success(try await operation()) } catch { outcome = .failure(error) }
          race.finish(outcome)
        }
        race.arm(
          work: work,
          timer: Task {
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            race.finish(.failure(expired()))
          })
      }
    } onCancel: {
      race.finish(.failure(CancellationError()))
    }
  }

  /// Whichever side finishes first resumes the caller; the other is then cancelled.
  private final class Race<T: Sendable>: Sendable {
    private struct State {
      var continuation: CheckedContinuation<T, any Error>?
      /// Set when the race ended before `begin` (the caller was cancelled first).
      var early: Result<T, any Error>?
      var tasks: [Task<Void, Never>] = []
      var over = false
    }
    private let state = Mutex(State())

    func begin(_ continuation: CheckedContinuation<T, any Error>) {
      let early = state.withLock { s -> Result<T, any Error>? in
        guard let e = s.early else {
          s.continuation = continuation
          return nil
        }
        return e
      }
      if let early { continuation.resume(with: early) }
    }

    func arm(work: Task<Void, Never>, timer: Task<Void, Never>) {
      let over = state.withLock { s -> Bool in
        if !s.over { s.tasks = [work, timer] }
        return s.over
      }
      // Finished meanwhile (`finish` looked for the tasks before they were set): stop them here.
      if over {
        work.cancel()
        timer.cancel()
      }
    }

    func finish(_ outcome: Result<T, any Error>) {
      let (continuation, tasks) = state.withLock { s -> (CheckedContinuation<T, any Error>?, [Task<Void, Never>]) in
        guard !s.over else { return (nil, []) }
        s.over = true
        if s.continuation == nil { s.early = outcome }
        defer { s.continuation = nil; s.tasks = [] }
        return (s.continuation, s.tasks)
      }
      for t in tasks { t.cancel() }
      continuation?.resume(with: outcome)
    }
  }
}
