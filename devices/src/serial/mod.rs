//! Serial consoles: a real tty or a simulated board on the exporter, a pty on the client.

pub mod bridge;
pub mod driver;
pub mod history;
pub mod ops;
pub mod sim;
pub mod spec;

pub use bridge::SerialBridge;
pub use driver::SerialDriver;
pub use spec::{SerialSpec, SimConsoleSpec};

use crate::board::SimBoard;
use std::sync::Arc;

impl SerialSpec {
    pub fn start(&self, name: &str) -> Arc<dyn crate::Driver> {
        Arc::new(SerialDriver::start(
            name.to_string(),
            driver::Source::Tty {
                path: self.path.clone(),
                settings: self.line_settings(),
                policy: self.line_settings,
            },
            spec::history_bytes(self.history),
        ))
    }
}

impl SimConsoleSpec {
    /// `exporter`: the default hostname; `board`: the simulated board whose power it follows.
    pub fn start(&self, name: &str, exporter: &str, board: &SimBoard) -> Arc<dyn crate::Driver> {
        Arc::new(SerialDriver::start(
            name.to_string(),
            driver::Source::Sim {
                hostname: self
                    .hostname
                    .clone()
                    .unwrap_or_else(|| exporter.to_string()),
                board: board.clone(),
            },
            spec::history_bytes(self.history),
        ))
    }
}
