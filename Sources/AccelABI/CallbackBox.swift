/// A closure held by reference, for callbacks stored in a lock.
///
/// Storing a closure directly in a generic container such as
/// `Mutex<((T) -> Void)?>` and reading it with `withLock { $0 }` reabstracts it
/// on every read and writes the thunk back through the `inout`, so each read
/// adds a layer of thunks and calls get slower without bound (this cost the
/// gateway more than half its throughput after a few thousand jobs). A class
/// reference is never reabstracted.
package final class CallbackBox<Argument>: Sendable {
  package let call: @Sendable (Argument) -> Void
  package init(_ call: @escaping @Sendable (Argument) -> Void) { self.call = call }
}
