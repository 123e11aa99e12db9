//! CAN buses: a SocketCAN interface, an slcan adapter or the simulated ECU on the exporter; a
//! vcan interface, or an slcan pty and a socketcand port, on the client. One channel per
//! attachment carries frames both ways as numbered, time-stamped records
//! (`jmp_protocol::kinds::can`).

pub mod backend;
pub mod bridge;
pub mod driver;
pub mod ops;
pub mod sim;
pub mod slcan;
pub mod socketcand;
pub mod spec;
pub mod vcan;

pub use bridge::CanBridge;
pub use driver::CanDriver;
pub use ops::CanArgs;
pub use spec::{CanSimSpec, CanSpec};

use crate::board::SimBoard;
use std::sync::Arc;

impl CanSpec {
    pub fn start(&self, name: &str) -> Arc<dyn crate::Driver> {
        let source = match (&self.interface, &self.slcan) {
            (Some(i), _) => driver::Source::SocketCan {
                interface: i.clone(),
                bitrate: self.bitrate,
                data_bitrate: self.data_bitrate,
                // A vcan interface can be told apart only once it exists; FD is assumed
                // unless the config says otherwise (frames the bus cannot carry are refused
                // by the kernel and counted).
                fd: self.fd(true),
            },
            (None, Some(s)) => driver::Source::Slcan {
                path: s.path.clone(),
                tty_baud: s.baudrate,
                bitrate: self.bitrate.unwrap_or(500_000),
                data_bitrate: self.data_bitrate,
                fd: self.fd(false),
            },
            (None, None) => unreachable!("validated: interface or slcan"),
        };
        Arc::new(CanDriver::start(name, source))
    }
}

impl CanSimSpec {
    /// `board`: the simulated board whose power the ECU follows.
    pub fn start(&self, name: &str, board: &SimBoard) -> Arc<dyn crate::Driver> {
        Arc::new(CanDriver::start(
            name,
            driver::Source::Sim(backend::SimConfig {
                bitrate: self.bitrate,
                period: self.period(),
                counter_id: self.counter_id,
                request_id: self.request_id,
                response_id: self.response_id,
                load: self.load,
                board: board.clone(),
            }),
        ))
    }
}
