//! `jmp power on|off|cycle|status`: a device request sent where the board is, answered with
//! the state afterwards.

use crate::kind::{KindVerb, Target, VerbError, VerbHost};
use crate::registry::{run_request, DeviceRequest};
use crate::BoxFuture;
use clap::Subcommand;
use jmp_protocol::exit as code;
use jmp_protocol::kinds::power::Request;
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum PowerVerb {
    /// Switch the board's power: on, off, cycle, status.
    Power {
        #[command(subcommand)]
        cmd: PowerCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum PowerCmd {
    /// Switch the board on.
    On {
        /// The power device (default: the only one).
        device: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Switch the board off.
    Off {
        /// The power device (default: the only one).
        device: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Off, wait, on.
    Cycle {
        /// The power device (default: the only one).
        device: Option<String>,
        /// How long to stay off, e.g. 500ms, 5s (default: the exporter's cycleDelay).
        #[arg(long)]
        delay: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Show the power state.
    Status {
        /// The power device (default: the only one).
        device: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

/// `--delay` in milliseconds: a duration (500ms, 5s) or a number of seconds.
fn delay_ms(d: &str) -> Result<u32, VerbError> {
    let parsed = humantime::parse_duration(d.trim())
        .or_else(|_| d.trim().parse::<u64>().map(Duration::from_secs))
        .map_err(|_| {
            VerbError::new(
                code::USAGE,
                format!("--delay {d:?}: not a duration (examples: 500ms, 5s)"),
            )
        })?;
    u32::try_from(parsed.as_millis())
        .map_err(|_| VerbError::new(code::USAGE, format!("--delay {d:?} is too long")))
}

impl KindVerb for PowerVerb {
    fn run(self, host: &dyn VerbHost) -> BoxFuture<'_, Result<(), VerbError>> {
        Box::pin(async move {
            let PowerVerb::Power { cmd } = self;
            let (device, target, req) = match cmd {
                PowerCmd::On { device, target } => (device, target, Request::On),
                PowerCmd::Off { device, target } => (device, target, Request::Off),
                PowerCmd::Status { device, target } => (device, target, Request::Status),
                PowerCmd::Cycle {
                    device,
                    delay,
                    target,
                } => {
                    let off_ms = delay.as_deref().map(delay_ms).transpose()?;
                    (device, target, Request::Cycle { off_ms })
                }
            };
            run_request(host, &target, device, DeviceRequest::Power(req)).await
        })
    }
}
