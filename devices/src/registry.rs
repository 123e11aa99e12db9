//! The one file that lists the device kinds. Adding a kind adds its folder, its wire module in
//! `jmp_protocol::kinds`, and a line in each table here; nothing else in the workspace names a
//! kind.

use crate::board::SimBoard;
use crate::{power, serial, storage, tcp, Bridge, BridgeCtx, Driver};
use jmp_protocol::codec::Codec;
use jmp_protocol::{DeviceInfo, Kind, Refusal};
use jmp_transport::Channels;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

/// A device in an exporter config: `type:` picks the kind's spec.
#[derive(Debug, Clone)]
pub enum DeviceSpec {
    Serial(serial::SerialSpec),
    SimConsole(serial::SimConsoleSpec),
    Tcp(tcp::TcpSpec),
    Power(power::PowerSpec),
    PowerSim(power::PowerSimSpec),
    Storage(storage::StorageSpec),
    StorageSim(storage::StorageSimSpec),
}

/// What the exporter builds drivers with.
pub struct BuildCtx<'a> {
    pub exporter: &'a str,
    /// Shared by every simulated backend of this exporter.
    pub board: &'a SimBoard,
}

/// Why a device's table was refused: where in the table (`parity`, `command.on`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path inside the device's table; empty for the table itself.
    pub path: String,
    pub message: String,
}

fn de<T: serde::de::DeserializeOwned>(v: serde_norway::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v).map_err(|e| FieldError {
        path: match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        },
        message: e.inner().to_string(),
    })
}

impl DeviceSpec {
    /// The `type:` names, for error messages.
    pub const TYPES: &'static [&'static str] = &[
        "serial",
        "sim-console",
        "tcp",
        "power",
        "power-sim",
        "storage",
        "storage-sim",
    ];

    /// Reads a device's table whose `type:` was `ty` (the rest of the table in `v`).
    pub fn from_yaml(ty: &str, v: serde_norway::Value) -> Result<DeviceSpec, FieldError> {
        Ok(match ty {
            "serial" => DeviceSpec::Serial(de(v)?),
            "sim-console" => DeviceSpec::SimConsole(de(v)?),
            "tcp" => DeviceSpec::Tcp(de(v)?),
            "power" => DeviceSpec::Power(de(v)?),
            "power-sim" => DeviceSpec::PowerSim(de(v)?),
            "storage" => DeviceSpec::Storage(de(v)?),
            "storage-sim" => DeviceSpec::StorageSim(de(v)?),
            other => {
                return Err(FieldError {
                    path: "type".into(),
                    message: format!(
                        "unknown device type {:?} (known: {})",
                        jmp_protocol::name::escape(other),
                        Self::TYPES.join(", ")
                    ),
                })
            }
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            DeviceSpec::Serial(_) | DeviceSpec::SimConsole(_) => Kind::Serial,
            DeviceSpec::Tcp(_) => Kind::Tcp,
            DeviceSpec::Power(_) | DeviceSpec::PowerSim(_) => Kind::Power,
            DeviceSpec::Storage(_) | DeviceSpec::StorageSim(_) => Kind::Storage,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        match self {
            DeviceSpec::Serial(s) => s.validate(),
            DeviceSpec::SimConsole(s) => s.validate(),
            DeviceSpec::Tcp(s) => s.validate(),
            DeviceSpec::Power(s) => s.validate(),
            DeviceSpec::PowerSim(s) => s.validate(),
            DeviceSpec::Storage(s) => s.validate(),
            DeviceSpec::StorageSim(s) => s.validate(),
        }
    }

    /// Starts the device's driver (background tasks need a tokio runtime).
    pub fn start(&self, name: &str, ctx: &BuildCtx) -> Arc<dyn Driver> {
        match self {
            DeviceSpec::Serial(s) => s.start(name),
            DeviceSpec::SimConsole(s) => s.start(name, ctx.exporter, ctx.board),
            DeviceSpec::Tcp(s) => s.start(name),
            DeviceSpec::Power(s) => s.start(name, ctx.exporter, ctx.board),
            DeviceSpec::PowerSim(s) => s.start(name, ctx.board),
            DeviceSpec::Storage(s) => s.start(name, ctx.board),
            DeviceSpec::StorageSim(s) => s.start(name, ctx.exporter, ctx.board),
        }
    }
}

/// `jmp attach` options that belong to a kind, flattened into the command line.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientOptions {
    #[command(flatten)]
    pub tcp: tcp::ClientArgs,
}

impl ClientOptions {
    /// Checks the options against what the exporter offers (a `--forward` naming a device that
    /// is not a TCP device, ...).
    pub fn check(&self, exporter: &str, devices: &[DeviceInfo]) -> Result<(), String> {
        self.tcp.check(exporter, devices)
    }

    /// Checks what can be checked before connecting (syntax).
    pub fn parse_check(&self) -> Result<(), String> {
        self.tcp.parse().map(|_| ())
    }
}

/// The client side of a device, or `None` for a kind this build does not know (it is listed,
/// not bridged).
pub async fn bridge(
    info: &DeviceInfo,
    ctx: &BridgeCtx,
    opts: &ClientOptions,
) -> Result<Option<Box<dyn Bridge>>, String> {
    let b: Box<dyn Bridge> = match &info.kind {
        Kind::Serial => Box::new(
            serial::SerialBridge::create(info, ctx)
                .map_err(|e| format!("cannot create the local serial device: {e}"))?,
        ),
        Kind::Tcp => Box::new(tcp::bridge::create(info, &opts.tcp).await?),
        Kind::Power => Box::new(power::PowerBridge::new(info)),
        Kind::Storage => Box::new(
            storage::StorageBridge::create(info, ctx)
                .map_err(|e| format!("cannot mount the storage device: {e}"))?,
        ),
        Kind::Other(_) => return Ok(None),
    };
    Ok(Some(b))
}

/// A short state for people (`jmp status`): a console's line settings, a switch's power.
pub fn summary(kind: &Kind, params: &[u8]) -> Option<String> {
    use jmp_protocol::kinds;
    match kind {
        Kind::Serial => kinds::serial::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| p.settings.to_string()),
        Kind::Tcp => kinds::tcp::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| format!("to {}:{}", p.host, p.port)),
        Kind::Power => kinds::power::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| format!("power {}", p.state)),
        Kind::Storage => kinds::storage::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| {
                let rw = if p.accepts_writes() {
                    "rw"
                } else if p.writable {
                    "ro: board on"
                } else {
                    "ro"
                };
                format!("{} MiB {rw}", p.size >> 20)
            }),
        Kind::Other(_) => None,
    }
}

/// An operation on a device, as `jmp serial` and `jmp power` ask for it (through an
/// attachment's control socket or on their own connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "request", rename_all = "kebab-case")]
pub enum DeviceRequest {
    Serial(jmp_protocol::kinds::serial::Request),
    Power(jmp_protocol::kinds::power::Request),
    Storage(jmp_protocol::kinds::storage::DeviceRequest),
}

/// Its typed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "response", rename_all = "kebab-case")]
pub enum DeviceResponse {
    Serial(jmp_protocol::kinds::serial::Response),
    Power(jmp_protocol::kinds::power::Response),
    Storage(jmp_protocol::kinds::storage::DeviceResponse),
}

impl DeviceRequest {
    pub fn kind(&self) -> Kind {
        match self {
            DeviceRequest::Serial(_) => Kind::Serial,
            DeviceRequest::Power(_) => Kind::Power,
            DeviceRequest::Storage(_) => Kind::Storage,
        }
    }

    /// Performs it over `link`; the answer and one line for people.
    pub async fn run(
        &self,
        link: &dyn Channels,
        device: &str,
    ) -> Result<(DeviceResponse, String), Refusal> {
        match self {
            DeviceRequest::Serial(r) => {
                let resp = serial::ops::request(link, device, r).await?;
                Ok((
                    DeviceResponse::Serial(resp),
                    serial::ops::describe(device, r, &resp),
                ))
            }
            DeviceRequest::Power(r) => {
                let resp = power::ops::request(link, device, r).await?;
                Ok((
                    DeviceResponse::Power(resp),
                    power::ops::describe(device, r, &resp),
                ))
            }
            DeviceRequest::Storage(r) => {
                let resp = storage::ops::request(link, device, r).await?;
                let line = storage::ops::describe(device, &resp);
                Ok((DeviceResponse::Storage(resp), line))
            }
        }
    }
}
