//! Exporter side of a power switch. Operations are serialized per device (a cycle is never
//! interleaved with an on from another request), each command has a timeout, and the state
//! after every operation is published so the attached client sees it change.

use super::command::{self, RunError};
use super::spec::{CommandSpec, MAX_WAIT};
use crate::board::Board;
use crate::{BoxFuture, DeviceStatus, Driver, Refusal};
use bytes::Bytes;
use jmp_protocol::codec::{to_bytes, Codec};
use jmp_protocol::kinds::power::{DeviceParams, PowerState, Request, Response};
use jmp_protocol::{ChannelMode, ErrorCode, Kind};
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

enum Backend {
    Commands {
        spec: CommandSpec,
        timeout: Duration,
        exporter: String,
        /// The exporter's board, told the real switch's state so that devices sharing the
        /// board (a storage medium behind an SD-mux) follow it; unknown counts as on.
        board: Board,
    },
    Sim(Board),
}

pub struct PowerDriver {
    name: String,
    backend: Backend,
    cycle_delay: Duration,
    /// Held for the whole of an operation.
    busy: Mutex<()>,
    state: watch::Sender<DeviceStatus>,
    status: watch::Receiver<DeviceStatus>,
}

fn status_of(state: PowerState, readable: bool) -> DeviceStatus {
    DeviceStatus::available(to_bytes(&DeviceParams { state, readable }))
}

impl PowerDriver {
    pub fn commands(
        name: &str,
        exporter: &str,
        board: Board,
        spec: CommandSpec,
        cycle_delay: Duration,
        timeout: Duration,
    ) -> Self {
        let readable = spec.status.is_some();
        Self::new(
            name,
            Backend::Commands {
                spec,
                timeout,
                exporter: exporter.to_string(),
                board,
            },
            cycle_delay,
            status_of(PowerState::Unknown, readable),
        )
    }

    pub fn sim(name: &str, board: Board, cycle_delay: Duration) -> Self {
        let on = board.powered();
        Self::new(
            name,
            Backend::Sim(board),
            cycle_delay,
            status_of(if on { PowerState::On } else { PowerState::Off }, true),
        )
    }

    fn new(name: &str, backend: Backend, cycle_delay: Duration, initial: DeviceStatus) -> Self {
        let (state, status) = watch::channel(initial);
        PowerDriver {
            name: name.to_string(),
            backend,
            cycle_delay,
            busy: Mutex::new(()),
            state,
            status,
        }
    }

    fn readable(&self) -> bool {
        match &self.backend {
            Backend::Commands { spec, .. } => spec.status.is_some(),
            Backend::Sim(_) => true,
        }
    }

    fn current(&self) -> PowerState {
        DeviceParams::decode_exact(&self.state.borrow().params)
            .map(|p| p.state)
            .unwrap_or(PowerState::Unknown)
    }

    fn publish(&self, s: PowerState) {
        if let Backend::Commands { board, .. } = &self.backend {
            board.set_power(s != PowerState::Off);
        }
        let new = status_of(s, self.readable());
        self.state.send_if_modified(|cur| {
            let changed = *cur != new;
            *cur = new;
            changed
        });
    }

    /// Switches to `on`; the state afterwards.
    async fn switch(&self, on: bool) -> Result<(), Refusal> {
        let what = if on { "on" } else { "off" };
        match &self.backend {
            Backend::Sim(board) => board.set_power(on),
            Backend::Commands {
                spec,
                timeout,
                exporter,
                ..
            } => {
                let argv = if on { &spec.on } else { &spec.off };
                let out = command::run(
                    argv,
                    &[
                        ("JMP_DEVICE", self.name.as_str()),
                        ("JMP_EXPORTER", exporter.as_str()),
                        ("JMP_POWER", what),
                    ],
                    *timeout,
                )
                .await
                .map_err(|e| self.run_failed(what, e))?;
                if !out.status.success() {
                    return Err(Refusal::new(
                        ErrorCode::Failed,
                        format!(
                            "{}: power {what} failed: {} {}{}",
                            self.name,
                            argv.join(" "),
                            describe_status(out.status),
                            tail(&out.stderr)
                        ),
                    ));
                }
            }
        }
        info!(device = %self.name, "power {what}");
        self.publish(if on { PowerState::On } else { PowerState::Off });
        Ok(())
    }

    fn run_failed(&self, what: &str, e: RunError) -> Refusal {
        let code = match e {
            RunError::Timeout { .. } => ErrorCode::Timeout,
            _ => ErrorCode::Failed,
        };
        warn!(device = %self.name, "power {what}: {e}");
        Refusal::new(code, format!("{}: power {what}: {e}", self.name))
    }

    /// Reads the real state where the backend can; else what was last set.
    async fn read(&self) -> Result<PowerState, Refusal> {
        match &self.backend {
            Backend::Sim(board) => Ok(if board.powered() {
                PowerState::On
            } else {
                PowerState::Off
            }),
            Backend::Commands {
                spec,
                timeout,
                exporter,
                ..
            } => {
                let Some(argv) = &spec.status else {
                    return Ok(self.current());
                };
                let out = command::run(
                    argv,
                    &[
                        ("JMP_DEVICE", self.name.as_str()),
                        ("JMP_EXPORTER", exporter.as_str()),
                        ("JMP_POWER", "status"),
                    ],
                    *timeout,
                )
                .await
                .map_err(|e| self.run_failed("status", e))?;
                let word = out
                    .stdout
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase();
                let s = match (word.as_str(), out.status.code()) {
                    ("on" | "1" | "true", _) => PowerState::On,
                    ("off" | "0" | "false", _) => PowerState::Off,
                    (_, Some(0)) => PowerState::On,
                    (_, Some(1)) => PowerState::Off,
                    _ => {
                        return Err(Refusal::new(
                            ErrorCode::Failed,
                            format!(
                                "{}: power status: {} {}, printing {:?}{}",
                                self.name,
                                argv.join(" "),
                                describe_status(out.status),
                                out.stdout.trim(),
                                tail(&out.stderr)
                            ),
                        ))
                    }
                };
                self.publish(s);
                Ok(s)
            }
        }
    }

    async fn perform(&self, req: Request) -> Result<PowerState, Refusal> {
        let _busy = self.busy.lock().await;
        match req {
            Request::On => self.switch(true).await?,
            Request::Off => self.switch(false).await?,
            Request::Cycle { off_ms } => {
                let delay = off_ms.map_or(self.cycle_delay, |ms| {
                    Duration::from_millis(ms.into()).min(MAX_WAIT)
                });
                self.switch(false).await?;
                tokio::time::sleep(delay).await;
                self.switch(true).await?;
            }
            Request::Status => return self.read().await,
        }
        Ok(self.current())
    }
}

fn describe_status(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// The last lines of a command's stderr, for the user's error message.
fn tail(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = t.lines().collect();
    let from = lines.len().saturating_sub(5);
    format!(": {}", lines[from..].join(" / "))
}

impl Driver for PowerDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> Kind {
        Kind::Power
    }

    fn detail(&self) -> String {
        match &self.backend {
            Backend::Commands { spec, .. } => format!("commands ({})", spec.on.join(" ")),
            Backend::Sim(_) => "simulated board".into(),
        }
    }

    fn status(&self) -> watch::Receiver<DeviceStatus> {
        self.status.clone()
    }

    fn modes(&self) -> &'static [ChannelMode] {
        &[]
    }

    fn power_switch(&self) -> Option<&dyn crate::PowerSwitch> {
        Some(self)
    }

    fn request<'a>(&'a self, body: Bytes) -> BoxFuture<'a, Result<Bytes, Refusal>> {
        Box::pin(async move {
            let req = Request::decode_exact(&body).map_err(|e| {
                Refusal::new(
                    ErrorCode::Protocol,
                    format!("{}: bad request: {e}", self.name),
                )
            })?;
            let state = self.perform(req).await?;
            Ok(to_bytes(&Response {
                state,
                readable: self.readable(),
            }))
        })
    }
}

impl crate::PowerSwitch for PowerDriver {
    fn switch_off(&self) -> BoxFuture<'_, Result<(), Refusal>> {
        Box::pin(async move { self.perform(Request::Off).await.map(|_| ()) })
    }

    fn is_on(&self, status: &DeviceStatus) -> bool {
        jmp_protocol::kinds::power::DeviceParams::decode_exact(&status.params)
            .is_ok_and(|p| p.state == PowerState::On)
    }
}
