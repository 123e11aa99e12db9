//! Typed client operations on a storage device that need no channel: its parameters and a
//! hash computed on the exporter (what `jmp storage` asks through an attachment's control
//! socket or a one-shot connection).

use jmp_protocol::kinds::storage::DeviceResponse;

/// One line for people saying what happened.
pub fn describe(device: &str, resp: &DeviceResponse) -> String {
    match resp {
        DeviceResponse::Info(p) => format!(
            "{device}: {} bytes ({} MiB), block size {}, {}{}",
            p.size,
            p.size >> 20,
            p.block_size,
            if p.accepts_writes() {
                "writable"
            } else if p.writable {
                "read-only while the board's power is on"
            } else {
                "read-only"
            },
            if p.shared {
                ", shared with the board"
            } else {
                ""
            }
        ),
        DeviceResponse::Hash { sha256 } => format!("{device}: sha256 {}", hex::encode(sha256)),
    }
}
