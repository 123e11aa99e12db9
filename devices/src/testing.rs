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

/// A [`BridgeCtx`](crate::BridgeCtx) for tests: exporter `exporter`, device nodes and mounts
/// in a fresh directory of their own (`$TMPDIR/jmp-devices-<tag>-<pid>`, emptied first), owned
/// by whoever runs the test. The directory is `ctx.dev_dir` (also `ctx.mount_dir`).
pub fn bridge_ctx(exporter: &str, tag: &str) -> crate::BridgeCtx {
    let dir = std::env::temp_dir().join(format!("jmp-devices-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::BridgeCtx {
        exporter: exporter.into(),
        dev_dir: dir.clone(),
        mount_dir: dir,
        owner: None,
        listen: None,
    }
}
