//! What an exporter config says about a serial console.

use crate::spec::{ByteSize, DurationSpec};
use jmp_protocol::kinds::serial::{
    FlowControl, LineSettings, Pacing, Parity, MAX_CHAR_DELAY_US, MAX_LINE_DELAY_US,
};
use std::time::Duration;
use serde::Deserialize;

/// Most history a console may keep.
pub const MAX_HISTORY: u64 = 64 * 1024 * 1024;

/// `type: serial`: a real serial port on the exporter host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SerialSpec {
    pub path: String,
    #[serde(default = "default_baud")]
    pub baudrate: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_parity")]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default = "default_flow")]
    pub flow_control: FlowControl,
    /// Console history kept for late or returning clients (bytes, or "64KiB", "1MiB").
    #[serde(default)]
    pub history: Option<ByteSize>,
    /// `fixed`: clients cannot change the port's line settings (a `picocom` started without
    /// `-b` would otherwise set the board's UART to 9600). Default `follow`.
    #[serde(default)]
    pub line_settings: LinePolicy,
    /// Pause after each character written to the port (e.g. `2ms`), for a bootloader that
    /// reads slowly; every client gets it, a `jmp console --char-delay` overrides it.
    #[serde(default)]
    pub tx_delay: Option<DurationSpec>,
    /// Further pause after each line end written to the port.
    #[serde(default)]
    pub line_delay: Option<DurationSpec>,
}

/// Whether clients may change the real port's line settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinePolicy {
    /// The port follows what local programs set on the pty, and `jmp serial set`.
    #[default]
    Follow,
    /// The configured settings stay; changes are refused with a notice naming this option.
    Fixed,
}

/// `type: sim-console`: the built-in simulated board's console.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SimConsoleSpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub history: Option<ByteSize>,
    #[serde(default)]
    pub tx_delay: Option<DurationSpec>,
    #[serde(default)]
    pub line_delay: Option<DurationSpec>,
    /// Read input as slowly as a bootloader does, losing what arrives faster (to test pacing).
    #[serde(default)]
    pub slow_input: Option<SlowInputSpec>,
}

/// `slowInput: {charTime: 500us, fifo: 16}`: the simulated board takes one typed byte per
/// `charTime` from a receive FIFO of `fifo` bytes; what arrives while it is full is lost.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SlowInputSpec {
    pub char_time: DurationSpec,
    #[serde(default = "default_fifo")]
    pub fifo: usize,
}

fn default_fifo() -> usize {
    16
}

/// Checks `txDelay` and `lineDelay` against what the protocol allows and makes them a pacing.
pub(crate) fn pacing(
    tx: Option<DurationSpec>,
    line: Option<DurationSpec>,
) -> Result<Pacing, String> {
    let us = |d: Option<DurationSpec>, max: u32, what: &str| -> Result<u32, String> {
        let d = d.map_or(Duration::ZERO, |d| d.0);
        if d.as_micros() > u128::from(max) {
            return Err(format!(
                "{what} {d:?} is longer than the {:?} allowed",
                Duration::from_micros(max.into())
            ));
        }
        Ok(d.as_micros() as u32)
    };
    Ok(Pacing {
        char_us: us(tx, MAX_CHAR_DELAY_US, "txDelay")?,
        line_us: us(line, MAX_LINE_DELAY_US, "lineDelay")?,
    })
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_parity() -> Parity {
    Parity::None
}
fn default_stop_bits() -> u8 {
    1
}
fn default_flow() -> FlowControl {
    FlowControl::None
}

fn check_history(h: Option<ByteSize>) -> Result<(), String> {
    match h {
        Some(h) if h.0 == 0 || h.0 > MAX_HISTORY => {
            Err(format!("history {} must be between 1 byte and 64MiB", h.0))
        }
        _ => Ok(()),
    }
}

pub(crate) fn history_bytes(h: Option<ByteSize>) -> usize {
    h.map(|h| h.0 as usize)
        .unwrap_or(super::history::DEFAULT_CAPACITY)
}

impl SerialSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.path.trim().is_empty() {
            return Err("path is empty".into());
        }
        if self.baudrate == 0 {
            return Err("baudrate must be positive".into());
        }
        if !(5..=8).contains(&self.data_bits) {
            return Err(format!("dataBits {} is not 5, 6, 7 or 8", self.data_bits));
        }
        if !(1..=2).contains(&self.stop_bits) {
            return Err(format!("stopBits {} is not 1 or 2", self.stop_bits));
        }
        pacing(self.tx_delay, self.line_delay)?;
        check_history(self.history)
    }

    pub fn line_settings(&self) -> LineSettings {
        LineSettings {
            baud: self.baudrate,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow: self.flow_control,
        }
    }
}

impl SimConsoleSpec {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(h) = &self.hostname {
            jmp_protocol::name::check("hostname", h).map_err(|e| e.to_string())?;
        }
        pacing(self.tx_delay, self.line_delay)?;
        if let Some(s) = &self.slow_input {
            if s.char_time.0.is_zero() || s.char_time.0 > Duration::from_secs(1) {
                return Err(format!(
                    "slowInput.charTime {:?} must be more than 0 and at most 1s",
                    s.char_time.0
                ));
            }
            if !(1..=4096).contains(&s.fifo) {
                return Err(format!("slowInput.fifo {} must be 1 to 4096 bytes", s.fifo));
            }
        }
        check_history(self.history)
    }
}
