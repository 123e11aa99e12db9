//! Serial consoles: a real tty or a simulated board on the exporter, a pty on the client.

pub mod bridge;
pub mod driver;
pub mod history;
pub mod ops;
pub mod sim;
pub mod spec;
pub mod verb;

pub use bridge::SerialBridge;
pub use driver::SerialDriver;
pub use spec::{SerialSpec, SimConsoleSpec};

use crate::board::Board;
use crate::kind::{
    BridgeError, InvalidSpec, BuildCtx, DeviceKind, NoOptions, Sandbox, Spec};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::serial as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;
use std::time::Duration;

/// The serial console kind.
pub struct Serial;

crate::config_types! {
    /// `type: serial` (a real port) or `type: sim-console` (the simulated board's console).
    pub enum SerialConfig {
        Tty(SerialSpec) = "serial" => "{path: /dev/ttyUSB0, baudrate: 115200}",
        Sim(SimConsoleSpec) = "sim-console" => "{hostname: board}",
    }
}

impl DeviceKind for Serial {
    const KIND: Kind = Kind::Serial;
    /// A break of the longest allowed duration, and margin.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
    type Config = SerialConfig;
    type Options = NoOptions;
    type Verb = verb::SerialVerb;
    type Request = wire::Request;
    type Response = wire::Response;

    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        _opts: &'a NoOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move {
            let b = SerialBridge::create(info, ctx)
                .map_err(|e| {
                    BridgeError::Local(format!("cannot create the local serial device: {e}"))
                })?;
            Ok(Box::new(b) as Box<dyn Bridge>)
        })
    }

    fn summary(params: &[u8]) -> Option<String> {
        wire::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| p.settings.to_string())
    }

    fn describe(device: &str, req: &wire::Request, resp: &wire::Response) -> String {
        ops::describe(device, req, resp)
    }
}

impl Spec for SerialSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        SerialSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, _ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        SerialSpec::start(self, name)
    }

    fn sandbox(&self, name: &str) -> Sandbox {
        Sandbox::tty(name, std::path::Path::new(&self.path), "serial port")
    }
}

impl Spec for SimConsoleSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        SimConsoleSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        SimConsoleSpec::start(self, name, ctx.exporter, ctx.board)
    }
}

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
    pub fn start(&self, name: &str, exporter: &str, board: &Board) -> Arc<dyn crate::Driver> {
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
