//! Typed client operations on a power switch.

use jmp_protocol::kinds::power::{Request, Response};

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
