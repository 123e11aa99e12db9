//! For tests of bridges and drivers without a network: serve an in-memory session
//! (`jmp_transport::channels::mem`) with a set of drivers, exactly as the exporter serves a
//! QUIC one.

use crate::serve::DeviceSet;
use jmp_transport::channels::mem::{self, MemChannels, MemEvent};
use std::sync::Arc;

/// An in-memory session whose exporter half serves `devices`; the task ends when the client
/// half is dropped. Abort the returned task to cut the "link".
pub fn mem_session(devices: DeviceSet) -> (Arc<MemChannels>, tokio::task::JoinHandle<()>) {
    let (client, mut events) = mem::pair();
    let task = tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                MemEvent::Incoming(inc) => devices.serve_incoming(inc),
                MemEvent::Request(r) => devices.serve_request(r),
                MemEvent::Closed { .. } => {}
            }
        }
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
