//! The one file that lists the device kinds. Adding a kind adds its folder, its wire module in
//! `jmp_protocol::kinds`, and a line in each table here; nothing else in the workspace names a
//! kind.

use crate::board::SimBoard;
use crate::{can, net, power, serial, storage, tcp, udp, Bridge, BridgeCtx, Driver};
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
    Network(net::NetSpec),
    Udp(udp::UdpSpec),
    Can(can::CanSpec),
    CanSim(can::CanSimSpec),
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
        "network",
        "udp",
        "can",
        "can-sim",
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
            "network" => DeviceSpec::Network(de(v)?),
            "udp" => DeviceSpec::Udp(de(v)?),
            "can" => DeviceSpec::Can(de(v)?),
            "can-sim" => DeviceSpec::CanSim(de(v)?),
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
            DeviceSpec::Network(_) => Kind::Network,
            DeviceSpec::Udp(_) => Kind::Udp,
            DeviceSpec::Can(_) | DeviceSpec::CanSim(_) => Kind::Can,
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
            DeviceSpec::Network(s) => s.validate(),
            DeviceSpec::Udp(s) => s.validate(),
            DeviceSpec::Can(s) => s.validate(),
            DeviceSpec::CanSim(s) => s.validate(),
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
            DeviceSpec::Network(s) => s.start(name, ctx.exporter),
            DeviceSpec::Udp(s) => s.start(name),
            DeviceSpec::Can(s) => s.start(name),
            DeviceSpec::CanSim(s) => s.start(name, ctx.board),
            DeviceSpec::Storage(s) => s.start(name, ctx.board),
            DeviceSpec::StorageSim(s) => s.start(name, ctx.exporter, ctx.board),
        }
    }
}

/// `jmp attach` options that belong to a kind, flattened into the command line.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientOptions {
    /// `--forward`, for TCP and UDP devices alike.
    #[command(flatten)]
    pub tcp: tcp::ClientArgs,
    #[command(flatten)]
    pub net: net::ClientArgs,
    #[command(flatten)]
    pub can: can::CanArgs,
}

impl ClientOptions {
    /// Checks the options against what the exporter offers (a `--forward` naming a device that
    /// is not a TCP device, ...).
    pub fn check(&self, exporter: &str, devices: &[DeviceInfo]) -> Result<(), String> {
        for name in self.tcp.parse()?.keys() {
            if !devices
                .iter()
                .any(|d| &d.name == name && matches!(d.kind, Kind::Tcp | Kind::Udp))
            {
                return Err(format!(
                    "--forward names {name:?}, which is not a TCP or UDP device of {exporter}"
                ));
            }
        }
        self.net.check(exporter, devices)?;
        self.can.check(exporter, devices)
    }

    /// Checks what can be checked before connecting (syntax).
    pub fn parse_check(&self) -> Result<(), String> {
        self.tcp.parse()?;
        self.net.parse()?;
        self.can.parse().map(|_| ())
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
        Kind::Network => Box::new(net::bridge::create(info, ctx, &opts.net).await?),
        Kind::Udp => Box::new(udp::bridge::create(info, &opts.tcp.parse()?).await?),
        Kind::Can => {
            Box::new(can::CanBridge::create(info, ctx, opts.can.for_device(&info.name)?).await?)
        }
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
        Kind::Network => kinds::net::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| {
                p.subnets
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }),
        Kind::Udp => kinds::udp::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| format!("to udp {}:{}", p.host, p.port)),
        Kind::Can => kinds::can::DeviceParams::decode_exact(params)
            .ok()
            .map(|p| p.to_string()),
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
