//! Typed client operations on a storage device that need no channel: its parameters and a
//! hash computed on the exporter (what `jmp storage` asks through an attachment's control
//! socket or a one-shot connection).

use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::storage::{DeviceRequest, DeviceResponse};
use jmp_protocol::{ErrorCode, Refusal};
use jmp_transport::Channels;
use std::time::Duration;

/// A hang guard: hashing a large card on the exporter reads all of it.
pub const TIMEOUT: Duration = Duration::from_secs(3600);

pub async fn request(
    link: &dyn Channels,
    device: &str,
    req: &DeviceRequest,
) -> Result<DeviceResponse, Refusal> {
    let body = link.request(device, to_bytes(req), TIMEOUT).await?;
    DeviceResponse::decode_exact(&body).map_err(|e| {
        Refusal::new(
            ErrorCode::Protocol,
            format!("{device}: bad answer from the exporter: {e}"),
        )
    })
}

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
