//! Power on the wire. A power device has no channels: everything is a device-level `Request`
//! answered by `Done`, and state changes are pushed as `Status`.
//!
//! - `DeviceInfo.params` and `Status.params`: [`DeviceParams`] (the state as the exporter knows
//!   it, and whether it can read the real state or only remembers what it last set).
//! - `Request.body`: [`Request`]; `Done.body`: [`Response`] (the state afterwards). A command
//!   that fails answers `Done` with code `failed` (or `timeout`) and its stderr in the reason.

use crate::codec::*;
use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    Off,
    On,
    /// Never set since the exporter started, and no way to read it.
    Unknown,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::Off => "off",
            PowerState::On => "on",
            PowerState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for PowerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceParams {
    pub state: PowerState,
    /// The backend can read the real state (a `status` command, the simulator); otherwise
    /// `state` is what jmp last set.
    pub readable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    On,
    Off,
    /// Off, wait, on. `off_ms`: how long to stay off (the exporter's configured delay if
    /// `None`).
    Cycle {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        off_ms: Option<u32>,
    },
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub state: PowerState,
    pub readable: bool,
}

fn state_wire(s: PowerState) -> u8 {
    match s {
        PowerState::Off => 0,
        PowerState::On => 1,
        PowerState::Unknown => 2,
    }
}

fn get_state(buf: &mut &[u8]) -> Result<PowerState, DecodeError> {
    match get_u8(buf, "power state")? {
        0 => Ok(PowerState::Off),
        1 => Ok(PowerState::On),
        2 => Ok(PowerState::Unknown),
        v => Err(DecodeError::Invalid {
            field: "power state",
            value: v.into(),
        }),
    }
}

fn get_bool(buf: &mut &[u8], what: &'static str) -> Result<bool, DecodeError> {
    match get_u8(buf, what)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(DecodeError::Invalid {
            field: what,
            value: v.into(),
        }),
    }
}

impl Codec for DeviceParams {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(state_wire(self.state));
        buf.put_u8(self.readable.into());
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(DeviceParams {
            state: get_state(buf)?,
            readable: get_bool(buf, "power readable")?,
        })
    }
    fn encoded_len(&self) -> usize {
        2
    }
}

impl Codec for Response {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(state_wire(self.state));
        buf.put_u8(self.readable.into());
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(Response {
            state: get_state(buf)?,
            readable: get_bool(buf, "power readable")?,
        })
    }
    fn encoded_len(&self) -> usize {
        2
    }
}

const R_ON: u8 = 0x01;
const R_OFF: u8 = 0x02;
const R_CYCLE: u8 = 0x03;
const R_STATUS: u8 = 0x04;

impl Codec for Request {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            Request::On => buf.put_u8(R_ON),
            Request::Off => buf.put_u8(R_OFF),
            Request::Cycle { off_ms } => {
                buf.put_u8(R_CYCLE);
                put_opt_varint(buf, off_ms.map(u64::from));
            }
            Request::Status => buf.put_u8(R_STATUS),
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "power request")? {
            R_ON => Ok(Request::On),
            R_OFF => Ok(Request::Off),
            R_CYCLE => {
                let off = get_opt_varint(buf, "cycle delay")?;
                let off_ms = match off {
                    None => None,
                    Some(v) => Some(u32::try_from(v).map_err(|_| DecodeError::Invalid {
                        field: "cycle delay",
                        value: v,
                    })?),
                };
                Ok(Request::Cycle { off_ms })
            }
            R_STATUS => Ok(Request::Status),
            t => Err(DecodeError::Invalid {
                field: "power request",
                value: t.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1 + match self {
            Request::Cycle { off_ms } => opt_varint_len(off_ms.map(u64::from)),
            _ => 0,
        }
    }
}

/// Decodes `data` as every body of this kind (the fuzz target `kind_bodies` runs it for every
/// kind): whatever the bytes, nothing panics and nothing grows without bound.
pub fn fuzz(data: &[u8]) {
    let _ = DeviceParams::decode_exact(data);
    let _ = Request::decode_exact(data);
    let _ = Response::decode_exact(data);
}

pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "power-params",
            to_bytes(&DeviceParams {
                state: PowerState::On,
                readable: true,
            })
            .to_vec(),
        ),
        (
            "power-request-cycle",
            to_bytes(&Request::Cycle { off_ms: Some(2000) }).to_vec(),
        ),
        (
            "power-response",
            to_bytes(&Response {
                state: PowerState::Off,
                readable: false,
            })
            .to_vec(),
        ),
    ]
}

pub fn decode_example(name: &str, bytes: &[u8]) -> bool {
    match name {
        "power-params" => DeviceParams::decode_exact(bytes).is_ok(),
        "power-request-cycle" => Request::decode_exact(bytes).is_ok(),
        "power-response" => Response::decode_exact(bytes).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::testing::*;
    use proptest::prelude::*;

    fn arb_state() -> impl Strategy<Value = PowerState> {
        prop_oneof![
            Just(PowerState::Off),
            Just(PowerState::On),
            Just(PowerState::Unknown)
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::On),
            Just(Request::Off),
            Just(Request::Status),
            proptest::option::of(any::<u32>()).prop_map(|off_ms| Request::Cycle { off_ms }),
        ]
    }

    proptest! {
        #[test]
        fn bodies_round_trip_and_survive_corruption(s in arb_state(), readable in any::<bool>(), r in arb_request(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            round_trip(&DeviceParams { state: s, readable });
            round_trip(&Response { state: s, readable });
            round_trip(&r);
            corrupt::<Request>(&to_bytes(&r), &flips, cut);
            corrupt::<DeviceParams>(&to_bytes(&DeviceParams { state: s, readable }), &flips, cut);
        }
    }

    #[test]
    fn requests_read_as_json_for_the_control_socket() {
        let r: Request = serde_json::from_str(r#"{"cycle":{"off_ms":500}}"#).expect("json");
        assert_eq!(r, Request::Cycle { off_ms: Some(500) });
        let r: Request = serde_json::from_str(r#""on""#).expect("json");
        assert_eq!(r, Request::On);
    }
}
