//! What an exporter config says about a CAN bus: `type: can` (a SocketCAN interface of the lab
//! host, or an slcan adapter on a serial path) and `type: can-sim` (the simulated ECU).

use crate::spec::DurationSpec;
use serde::Deserialize;
use std::time::Duration;

/// `type: can`: exactly one of `interface` and `slcan`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanSpec {
    /// A SocketCAN interface of the exporter host (`can0`, `vcan0`).
    #[serde(default)]
    pub interface: Option<String>,
    /// A USB/serial adapter speaking slcan (Lawicel ASCII; CANable and compatibles).
    #[serde(default)]
    pub slcan: Option<SlcanSpec>,
    /// Nominal bit rate in bit/s. The exporter sets it; clients asking for another one are
    /// refused. Required for slcan adapters; for SocketCAN it is applied to real CAN interfaces
    /// (virtual ones have none).
    #[serde(default)]
    pub bitrate: Option<u32>,
    /// CAN FD data-phase bit rate (enables CAN FD).
    #[serde(default)]
    pub data_bitrate: Option<u32>,
    /// Whether the bus carries CAN FD frames (default: when `dataBitrate` is set, and always on a
    /// virtual SocketCAN interface).
    #[serde(default)]
    pub fd: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SlcanSpec {
    pub path: String,
    /// The serial line's speed (ignored by USB CDC adapters; default 115200).
    #[serde(default = "default_tty_baud")]
    pub baudrate: u32,
}

fn default_tty_baud() -> u32 {
    115_200
}

/// `type: can-sim`: a simulated ECU on a simulated bus, following the simulated board's power.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CanSimSpec {
    /// The bus's nominal bit rate (what clients see; default 500000).
    #[serde(default = "default_bitrate")]
    pub bitrate: u32,
    /// How often the ECU sends its counter frame (default 100ms; 0 turns it off).
    #[serde(default)]
    pub period: Option<DurationSpec>,
    /// Id of the counter frame (default 0x100).
    #[serde(default = "default_counter_id")]
    pub counter_id: u32,
    /// ISO-TP request id the ECU answers (default 0x7e0) ...
    #[serde(default = "default_request_id")]
    pub request_id: u32,
    /// ... on this id (default 0x7e8).
    #[serde(default = "default_response_id")]
    pub response_id: u32,
    /// Extra periodic traffic in frames per second (id 0x7ff), to load the bus (default 0; a
    /// 1 Mbit/s bus carries about 9000 8-byte frames a second).
    #[serde(default)]
    pub load: u32,
}

fn default_bitrate() -> u32 {
    500_000
}
fn default_counter_id() -> u32 {
    0x100
}
fn default_request_id() -> u32 {
    0x7e0
}
fn default_response_id() -> u32 {
    0x7e8
}

/// Most background load the simulator generates (frames per second).
pub const MAX_LOAD: u32 = 100_000;

/// The slcan `Sn` codes and the nominal bit rates they select.
pub const SLCAN_BITRATES: [(u32, char); 10] = [
    (10_000, '0'),
    (20_000, '1'),
    (50_000, '2'),
    (100_000, '3'),
    (125_000, '4'),
    (250_000, '5'),
    (500_000, '6'),
    (750_000, '7'),
    (1_000_000, '8'),
    (83_300, '9'),
];

/// The CANable-2 `Yn` codes and the data bit rates they select.
pub const SLCAN_DATA_BITRATES: [(u32, char); 4] = [
    (1_000_000, '1'),
    (2_000_000, '2'),
    (4_000_000, '4'),
    (5_000_000, '5'),
];

pub fn slcan_bitrate_code(b: u32) -> Option<char> {
    SLCAN_BITRATES
        .iter()
        .find(|(r, _)| *r == b)
        .map(|(_, c)| *c)
}

pub fn slcan_data_bitrate_code(b: u32) -> Option<char> {
    SLCAN_DATA_BITRATES
        .iter()
        .find(|(r, _)| *r == b)
        .map(|(_, c)| *c)
}

/// Checks a local interface name: what the kernel accepts (1–15 bytes, no `/`, whitespace or
/// `:`), and not `.`/`..`.
pub fn check_ifname(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {:?} is not an interface name (1-15 of A-Z a-z 0-9 . _ -)",
            jmp_protocol::name::escape(name)
        ))
    }
}

impl CanSpec {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.interface, &self.slcan) {
            (Some(_), Some(_)) => {
                return Err("give either interface (SocketCAN) or slcan (an adapter), not both".into())
            }
            (None, None) => {
                return Err(
                    "give interface (a SocketCAN interface such as can0) or slcan: {path: /dev/ttyACM0}"
                        .into(),
                )
            }
            (Some(i), None) => check_ifname("interface", i)?,
            (None, Some(s)) => {
                if s.path.trim().is_empty() {
                    return Err("slcan.path is empty".into());
                }
                let b = self
                    .bitrate
                    .ok_or("bitrate is required for an slcan adapter (the exporter sets it)")?;
                if slcan_bitrate_code(b).is_none() {
                    return Err(format!(
                        "bitrate {b} is not one an slcan adapter can select (S0-S9: {})",
                        SLCAN_BITRATES
                            .iter()
                            .map(|(r, _)| r.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if let Some(d) = self.data_bitrate {
                    if slcan_data_bitrate_code(d).is_none() {
                        return Err(format!(
                            "dataBitrate {d} is not one a CANable 2 can select (Y1, Y2, Y4, Y5: 1, 2, 4 or 5 Mbit/s)"
                        ));
                    }
                }
            }
        }
        if self.bitrate == Some(0) || self.data_bitrate == Some(0) {
            return Err("bit rates must be positive".into());
        }
        if self.fd == Some(false) && self.data_bitrate.is_some() {
            return Err("dataBitrate is set but fd is false".into());
        }
        Ok(())
    }

    /// Whether the bus carries CAN FD (`virtual_bus`: a vcan interface, which always can).
    pub fn fd(&self, virtual_bus: bool) -> bool {
        self.fd
            .unwrap_or(self.data_bitrate.is_some() || (virtual_bus && self.slcan.is_none()))
    }
}

impl CanSimSpec {
    pub fn validate(&self) -> Result<(), String> {
        for (what, id) in [
            ("counterId", self.counter_id),
            ("requestId", self.request_id),
            ("responseId", self.response_id),
        ] {
            if id > jmp_protocol::kinds::can::MAX_STANDARD_ID {
                return Err(format!("{what} 0x{id:x} is not an 11-bit id"));
            }
        }
        if self.request_id == self.response_id {
            return Err("requestId and responseId must differ".into());
        }
        if self.load > MAX_LOAD {
            return Err(format!(
                "load {} is more than the {MAX_LOAD} frames/s allowed",
                self.load
            ));
        }
        if self.bitrate == 0 {
            return Err("bitrate must be positive".into());
        }
        Ok(())
    }

    pub fn period(&self) -> Option<Duration> {
        match self.period {
            None => Some(Duration::from_millis(100)),
            Some(d) if d.0.is_zero() => None,
            Some(d) => Some(d.0),
        }
    }
}
