//! Tasks that end with their owner.

/// A spawned task aborted when this is dropped (a bridge's `run` can be dropped at any time).
pub struct TaskGuard(pub tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
