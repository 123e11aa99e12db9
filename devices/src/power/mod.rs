//! Power: a board's power switch as `jmp power on|off|cycle|status`. No channels: every
//! operation is a device request, answered with the state afterwards, and changes are pushed
//! to the attached client as status. Backends: external commands (a relay board's CLI, a PDU's
//! `snmpset`, `uhubctl`) and the simulated board.

pub mod agent;
pub mod bridge;
pub mod command;
pub mod driver;
pub mod ops;
pub mod spec;
pub mod verb;

pub use bridge::PowerBridge;
pub use driver::PowerDriver;
pub use spec::{PowerSimSpec, PowerSpec};

use crate::kind::{
    BridgeError, InvalidSpec, BuildCtx, DeviceKind, NoOptions, Sandbox, Spec};
use crate::{BoxFuture, Bridge, BridgeCtx};
use jmp_protocol::codec::Codec;
use jmp_protocol::kinds::power as wire;
use jmp_protocol::{DeviceInfo, Kind};
use std::sync::Arc;
use std::time::Duration;

/// The power switch kind.
pub struct Power;

crate::config_types! {
    /// `type: power` (commands run on the exporter host) or `type: power-sim` (the simulated
    /// board's power).
    pub enum PowerConfig {
        Commands(PowerSpec) = "power" => "{command: {on: [relay, '3', 'on'], off: [relay, '3', 'off']}}",
        Sim(PowerSimSpec) = "power-sim" => "{cycleDelay: 200ms}",
    }
}

impl DeviceKind for Power {
    const KIND: Kind = Kind::Power;
    /// A guard against a hang only: the exporter enforces each command's own timeout and
    /// answers `timeout`; a cycle is two commands and a delay.
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(1300);
    type Config = PowerConfig;
    type Options = NoOptions;
    type Verb = verb::PowerVerb;
    type Request = wire::Request;
    type Response = wire::Response;

    fn bridge<'a>(
        info: &'a DeviceInfo,
        _ctx: &'a BridgeCtx,
        _opts: &'a NoOptions,
    ) -> BoxFuture<'a, Result<Box<dyn Bridge>, BridgeError>> {
        Box::pin(async move { Ok(Box::new(PowerBridge::new(info)) as Box<dyn Bridge>) })
    }

    fn summary(params: &[u8]) -> Option<String> {
        wire::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| format!("power {}", p.state))
    }

    fn describe(device: &str, req: &wire::Request, resp: &wire::Response) -> String {
        ops::describe(device, req, resp)
    }

    fn agent_tools() -> Vec<Box<dyn crate::agent::AgentTool>> {
        agent::tools()
    }

    fn power(action: crate::kind::PowerAction) -> Option<wire::Request> {
        use crate::kind::PowerAction;
        Some(match action {
            PowerAction::On => wire::Request::On,
            PowerAction::Off => wire::Request::Off,
            PowerAction::Cycle => wire::Request::Cycle { off_ms: None },
        })
    }
}

impl Spec for PowerSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        PowerSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        PowerSpec::start(self, name, ctx.exporter, ctx.board)
    }

    fn sandbox(&self, name: &str) -> Sandbox {
        let mut s = Sandbox::default();
        s.note(format!(
            "{name}: power commands run inside this sandbox; grant what they use (e.g. DeviceAllow=char-usb_device rw is there for USB relays, IPAddressAllow= for a PDU)"
        ));
        s
    }

    fn switches_power(&self) -> bool {
        true
    }
}

impl Spec for PowerSimSpec {
    fn validate(&self) -> Result<(), InvalidSpec> {
        PowerSimSpec::validate(self).map_err(InvalidSpec)
    }

    fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn crate::Driver> {
        PowerSimSpec::start(self, name, ctx.board)
    }

    fn switches_power(&self) -> bool {
        true
    }
}
