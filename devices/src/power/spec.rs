//! What an exporter config says about a power switch.

use crate::board::Board;
use crate::spec::DurationSpec;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Default time off during a cycle: long enough for a board's supply to drain.
pub const DEFAULT_CYCLE_DELAY: Duration = Duration::from_secs(2);
/// Default time one command may take before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest cycle delay and command timeout a config or a request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// `type: power`: a switch driven by commands run on the exporter host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PowerSpec {
    pub command: CommandSpec,
    /// How long a cycle keeps the board off (default 2s).
    #[serde(default)]
    pub cycle_delay: Option<DurationSpec>,
    /// How long each command may run before it is killed (default 30s).
    #[serde(default)]
    pub timeout: Option<DurationSpec>,
}

/// The commands, each an argv list run without a shell (`[relay-ctl, "--port", "3", on]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    pub on: Vec<String>,
    pub off: Vec<String>,
    /// Reads the real state: stdout "on"/"off" (also 1/0, true/false), or else exit status 0
    /// for on and 1 for off. Without it, the state is what jmp last set.
    #[serde(default)]
    pub status: Option<Vec<String>>,
}

/// `type: power-sim`: the simulated board's power (its console goes quiet when off and boots
/// again when on).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PowerSimSpec {
    /// How long a cycle keeps the board off (default 200ms: nothing to drain).
    #[serde(default)]
    pub cycle_delay: Option<DurationSpec>,
}

fn check_wait(what: &str, d: Option<DurationSpec>) -> Result<(), String> {
    match d {
        Some(d) if d.0 > MAX_WAIT => Err(format!(
            "{what} {:?} is longer than the {}s allowed",
            d.0,
            MAX_WAIT.as_secs()
        )),
        Some(d) if d.0.is_zero() && what == "timeout" => Err("timeout must be positive".into()),
        _ => Ok(()),
    }
}

fn check_argv(what: &str, argv: &[String]) -> Result<(), String> {
    match argv.first() {
        None => Err(format!(
            "command.{what} is empty: give the program and its arguments as a list"
        )),
        Some(p) if p.trim().is_empty() => Err(format!("command.{what}: the program name is empty")),
        Some(_) => Ok(()),
    }
}

impl PowerSpec {
    pub fn validate(&self) -> Result<(), String> {
        check_argv("on", &self.command.on)?;
        check_argv("off", &self.command.off)?;
        if let Some(s) = &self.command.status {
            check_argv("status", s)?;
        }
        check_wait("cycleDelay", self.cycle_delay)?;
        check_wait("timeout", self.timeout)
    }

    pub fn start(&self, name: &str, exporter: &str, board: &Board) -> Arc<dyn crate::Driver> {
        Arc::new(super::PowerDriver::commands(
            name,
            exporter,
            board.clone(),
            self.command.clone(),
            self.cycle_delay.map_or(DEFAULT_CYCLE_DELAY, |d| d.0),
            self.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0),
        ))
    }
}

impl PowerSimSpec {
    pub fn validate(&self) -> Result<(), String> {
        check_wait("cycleDelay", self.cycle_delay)
    }

    pub fn start(&self, name: &str, board: &Board) -> Arc<dyn crate::Driver> {
        Arc::new(super::PowerDriver::sim(
            name,
            board.clone(),
            self.cycle_delay.map_or(Duration::from_millis(200), |d| d.0),
        ))
    }
}
