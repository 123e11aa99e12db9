//! UDP forwards on the wire: each local source address (one *flow*) is one datagram channel;
//! every QUIC datagram carries one UDP payload, whole, both ways. `DeviceInfo.params` is
//! [`DeviceParams`] (the target as the exporter sees it); opens carry no parameters and no
//! requests exist. A payload larger than the datagram the path allows is not sent (the sender
//! counts it): UDP payloads are never cut or split.

use crate::codec::*;
use bytes::{BufMut, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceParams {
    pub host: String,
    pub port: u16,
}

impl Codec for DeviceParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_str(buf, &self.host);
        buf.put_u16(self.port);
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let host = get_str(buf, "udp host")?;
        if buf.len() < 2 {
            return Err(DecodeError::Truncated("udp port"));
        }
        let port = u16::from_be_bytes([buf[0], buf[1]]);
        *buf = &buf[2..];
        Ok(DeviceParams { host, port })
    }
    fn encoded_len(&self) -> usize {
        str_len(&self.host) + 2
    }
}

/// Decodes `data` as every body of this kind (the fuzz target `kind_bodies` runs it for every
/// kind): whatever the bytes, nothing panics and nothing grows without bound.
pub fn fuzz(data: &[u8]) {
    let _ = DeviceParams::decode_exact(data);
}

pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    vec![(
        "udp-params",
        to_bytes(&DeviceParams {
            host: "192.168.10.2".into(),
            port: 69,
        })
        .to_vec(),
    )]
}

pub fn decode_example(name: &str, bytes: &[u8]) -> bool {
    name == "udp-params" && DeviceParams::decode_exact(bytes).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::testing::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn params_round_trip_and_corruption(host in any::<String>(), port in any::<u16>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            let p = DeviceParams { host, port };
            round_trip(&p);
            corrupt::<DeviceParams>(&to_bytes(&p), &flips, cut);
        }
    }
}
