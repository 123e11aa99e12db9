//! Typed client operations on a power switch.

use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::power::{Request, Response};
use jmp_protocol::{ErrorCode, Refusal};
use jmp_transport::Channels;
use std::time::Duration;

/// A hang guard only: the exporter enforces each command's own timeout and answers `timeout`;
/// a cycle is two commands and a delay.
pub const TIMEOUT: Duration = Duration::from_secs(1300);

pub async fn request(
    link: &dyn Channels,
    device: &str,
    req: &Request,
) -> Result<Response, Refusal> {
    let body = link.request(device, to_bytes(req), TIMEOUT).await?;
    Response::decode_exact(&body).map_err(|e| {
        Refusal::new(
            ErrorCode::Protocol,
            format!("{device}: bad answer from the exporter: {e}"),
        )
    })
}

/// One line for people saying what happened.
pub fn describe(device: &str, req: &Request, resp: &Response) -> String {
    let how = if resp.readable {
        ""
    } else {
        " (as last set; the exporter cannot read it)"
    };
    match req {
        Request::On | Request::Off | Request::Cycle { .. } => {
            let verb = match req {
                Request::On => "switched on",
                Request::Off => "switched off",
                _ => "cycled",
            };
            format!("{device}: {verb}; power is {}", resp.state)
        }
        Request::Status => format!("{device}: power is {}{how}", resp.state),
    }
}
