//! For tests of bridges and drivers without a network: serve an in-memory session
//! (`jmp_transport::channels::mem`) with a set of drivers, exactly as the exporter serves a
//! QUIC one.

use crate::serve::DeviceSet;
use jmp_transport::channels::mem::{self, MemChannels, MemEvent};
use std::sync::Arc;

/// An in-memory session whose exporter half serves `devices`, as one session of the exporter
/// (its budget, its channels ending with it). When the client half is dropped the task lives
/// on until the channels opened on it end (their pipes may outlive the handle). Abort the
/// returned task to cut the "link": that ends the session and everything served in it, as a
/// lost connection does.
pub fn mem_session(devices: DeviceSet) -> (Arc<MemChannels>, tokio::task::JoinHandle<()>) {
    mem_session_with(devices, crate::budget::LIMITS)
}

/// [`mem_session`] with other budget limits (tests of the budgets).
pub fn mem_session_with(
    devices: DeviceSet,
    limits: crate::budget::Limits,
) -> (Arc<MemChannels>, tokio::task::JoinHandle<()>) {
    let (client, mut events) = mem::pair();
    let task = tokio::spawn(async move {
        let scope = devices.session_with(limits);
        while let Some(ev) = events.recv().await {
            match ev {
                MemEvent::Incoming(inc) => scope.serve_incoming(inc),
                MemEvent::Request(r) => scope.serve_request(r),
                MemEvent::Closed { channel } => scope.closed(channel),
            }
        }
        scope.finish().await;
    });
    (Arc::new(client), task)
}
