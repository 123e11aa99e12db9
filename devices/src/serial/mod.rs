//! Serial consoles: a real tty or a simulated board on the exporter, a pty on the client.

pub mod agent;
pub mod bridge;
pub mod console;
pub mod driver;
pub mod history;
pub mod ops;
pub mod pace;
pub mod sim;
pub mod spec;
pub mod verb;

pub use bridge::SerialBridge;
pub use driver::SerialDriver;
pub use spec::{SerialSpec, SimConsoleSpec};

use crate::board::Board;
use crate::kind::{BridgeError, BuildCtx, DeviceKind, InvalidSpec, Sandbox, Spec};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::serial as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;
use std::time::Duration;

/// The serial console kind.
pub struct Serial;

/// `jmp attach`'s options for the board's consoles.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SerialArgs {
    /// Pacing of what this attachment's programs type on the consoles (picocom, pyserial,
    /// pastes into a slow bootloader): the exporter pauses this long after each character it
    /// writes to the port (e.g. 2ms). Overrides the exporter config's `txDelay` for this
    /// attachment; `jmp console --char-delay` overrides it in turn.
    #[arg(long = "char-delay", value_name = "DELAY", value_parser = console::parse_char_delay)]
    pub char_delay: Option<Duration>,
    /// Further pause after each line end (e.g. 50ms); overrides the config's `lineDelay`.
    #[arg(long = "line-delay", value_name = "DELAY", value_parser = console::parse_line_delay)]
    pub line_delay: Option<Duration>,
}

crate::config_types! {
    /// `type: serial` (a real port) or `type: sim-console` (the simulated board's console).
    pub enum SerialConfig {
        Tty(SerialSpec) = "serial" => "{path: /dev/ttyUSB0, baudrate: 115200, txDelay: 2ms, lineDelay: 20ms}",
        Sim(SimConsoleSpec) = "sim-console" => "{hostname: board, slowInput: {charTime: 500us}}",
    }
}

impl DeviceKind for Serial {
    const KIND: Kind = Kind::Serial;
    /// A break of the longest allowed duration, and margin.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
    type Config = SerialConfig;
    type Options = SerialArgs;
    type Verb = verb::SerialVerb;
    type Request = wire::Request;
    type Response = wire::Response;

    fn bridge<'a>(
        info: &'a DeviceInfo,
        ctx: &'a BridgeCtx,
        opts: &'a SerialArgs,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move {
            let b = SerialBridge::create(info, ctx)
                .map_err(|e| {
                    BridgeError::Local(format!("cannot create the local serial device: {e}"))
                })?
                .with_pacing(console::pacing_of(opts.char_delay, opts.line_delay));
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

    fn agent_tools() -> Vec<Box<dyn crate::agent::AgentTool>> {
        agent::tools()
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
        )
        .with_pacing(spec::pacing(self.tx_delay, self.line_delay).unwrap_or_default()))
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
                slow: self
                    .slow_input
                    .as_ref()
                    .map(|s| pace::SlowReader::new(s.fifo, s.char_time.0)),
            },
            spec::history_bytes(self.history),
        )
        .with_pacing(spec::pacing(self.tx_delay, self.line_delay).unwrap_or_default()))
    }
}
