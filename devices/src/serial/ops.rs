//! Typed client operations on a serial console: what a pty cannot carry (parity, data bits,
//! break, modem lines), as device requests answered by the exporter with the port's settings.

use jmp_protocol::kinds::serial::{Request, Response};

/// One line for people saying what was done.
pub fn describe(device: &str, req: &Request, resp: &Response) -> String {
    let s = resp.settings;
    match req {
        Request::Break { millis } => format!("{device}: break of {millis} ms sent"),
        Request::Set(_) => format!("{device}: the port now runs {s}"),
        Request::Modem { dtr, rts } => {
            let v = |x: &Option<bool>| match x {
                None => "unchanged",
                Some(true) => "on",
                Some(false) => "off",
            };
            format!("{device}: DTR {}, RTS {}", v(dtr), v(rts))
        }
        Request::Get => format!("{device}: {s}"),
    }
}
