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
