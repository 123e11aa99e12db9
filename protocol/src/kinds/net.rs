//! Network devices on the wire: the board's subnets reached through a tunnel of IP packets, or
//! through SOCKS5 CONNECTs made by the exporter.
//!
//! - `DeviceInfo.params` is [`DeviceParams`]: the exported IPv4 subnets and the tunnel's MTU.
//! - A tunnel is a datagram channel opened with [`Open::Tunnel`]; the exporter answers with
//!   [`Assigned`] (the client's tunnel address, kept across reconnects when the client asks for
//!   it again). Each datagram is one whole IPv4 packet, checksums complete. The tunnel's
//!   stream channel ([`Open::Fallback`]) carries what a datagram cannot: the kernel's
//!   super-packets (TSO/GSO, up to 64 KiB, resegmented by the receiving kernel) and packets
//!   larger than the datagram size the path allows now. Each frame there is a 2-byte
//!   big-endian length, a 2-byte segment size (0: an ordinary packet; else the MSS the
//!   super-packet is cut into) and the packet.
//! - A SOCKS CONNECT is a stream channel opened with [`Open::Connect`]: the exporter resolves
//!   the name, connects only to addresses inside its subnets, answers with [`Connected`] and
//!   then carries raw bytes like a TCP forward. A refusal's reason starts with one of the
//!   [`refusal`] words, which the client maps to a SOCKS reply code.

use crate::codec::*;
use bytes::{BufMut, BytesMut};
use std::net::{Ipv4Addr, SocketAddrV4};

/// An IPv4 subnet: an address with its host bits zero, and a prefix length 0-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// `None` if `prefix` > 32 or host bits are set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Subnet> {
        if prefix > 32 || u32::from(addr) & !mask(prefix) != 0 {
            return None;
        }
        Some(Subnet { addr, prefix })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether the two share any address (one contains the other).
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let p = self.prefix.min(other.prefix);
        u32::from(self.addr) & mask(p) == u32::from(other.addr) & mask(p)
    }

    /// The `n`th address of the subnet (`None` beyond its size).
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - self.prefix as u32);
        if u64::from(n) >= size {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.addr) + n))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32) as u32)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;
    /// `192.168.10.0/24`; a bare address is a /32.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 subnet like 192.168.10.0/24"))?;
        let prefix: u8 = p
            .trim()
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0-32"))?;
        Subnet::new(addr, prefix).ok_or_else(|| {
            let net = Ipv4Addr::from(u32::from(addr) & mask(prefix));
            format!("{s:?} has host bits set (the subnet is {net}/{prefix})")
        })
    }
}

impl Codec for Subnet {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_slice(&self.addr.octets());
        buf.put_u8(self.prefix);
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let addr = get_ipv4(buf, "subnet address")?;
        let prefix = get_u8(buf, "subnet prefix")?;
        Subnet::new(addr, prefix).ok_or(DecodeError::Invalid {
            field: "subnet",
            value: prefix.into(),
        })
    }
    fn encoded_len(&self) -> usize {
        5
    }
}

fn get_ipv4(buf: &mut &[u8], what: &'static str) -> Result<Ipv4Addr, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated(what));
    }
    let a = Ipv4Addr::new(buf[0], buf[1], buf[2], buf[3]);
    *buf = &buf[4..];
    Ok(a)
}

fn get_u16(buf: &mut &[u8], what: &'static str) -> Result<u16, DecodeError> {
    if buf.len() < 2 {
        return Err(DecodeError::Truncated(what));
    }
    let v = u16::from_be_bytes([buf[0], buf[1]]);
    *buf = &buf[2..];
    Ok(v)
}

/// What a network device offers: `DeviceInfo.params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceParams {
    /// The only destinations the exporter forwards to.
    pub subnets: Vec<Subnet>,
    /// The tunnel interfaces' MTU (both ends use it, so inner TCP picks segments that fit).
    pub mtu: u16,
}

impl Codec for DeviceParams {
    fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.subnets.len() as u64);
        for s in &self.subnets {
            s.encode(buf);
        }
        buf.put_u16(self.mtu);
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let n = get_count(buf, "net subnets", 5)?;
        let mut subnets = Vec::with_capacity(n);
        for _ in 0..n {
            subnets.push(Subnet::decode(buf)?);
        }
        let mtu = get_u16(buf, "net mtu")?;
        Ok(DeviceParams { subnets, mtu })
    }
    fn encoded_len(&self) -> usize {
        varint_len(self.subnets.len() as u64) + 5 * self.subnets.len() + 2
    }
}

/// `Open.params` of a network device's channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// The tunnel's datagram channel; `want` is the address the client had before (kept if
    /// free, so a reconnect leaves the client's interface and routes as they are).
    Tunnel { want: Option<Ipv4Addr> },
    /// The stream channel for packets of the tunnel of client address `addr` that fit no
    /// datagram.
    Fallback { addr: Ipv4Addr },
    /// A TCP connection made by the exporter (SOCKS CONNECT); `host` is a name or an address
    /// literal, resolved on the exporter.
    Connect { host: String, port: u16 },
}

impl Codec for Open {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            Open::Tunnel { want } => {
                buf.put_u8(1);
                match want {
                    None => buf.put_u8(0),
                    Some(a) => {
                        buf.put_u8(1);
                        buf.put_slice(&a.octets());
                    }
                }
            }
            Open::Fallback { addr } => {
                buf.put_u8(2);
                buf.put_slice(&addr.octets());
            }
            Open::Connect { host, port } => {
                buf.put_u8(3);
                put_str(buf, host);
                buf.put_u16(*port);
            }
        }
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        match get_u8(buf, "net open")? {
            1 => {
                let want = match get_u8(buf, "net tunnel want")? {
                    0 => None,
                    1 => Some(get_ipv4(buf, "net tunnel want")?),
                    v => {
                        return Err(DecodeError::Invalid {
                            field: "net tunnel want",
                            value: v.into(),
                        })
                    }
                };
                Ok(Open::Tunnel { want })
            }
            2 => Ok(Open::Fallback {
                addr: get_ipv4(buf, "net fallback address")?,
            }),
            3 => {
                let host = get_str(buf, "net connect host")?;
                let port = get_u16(buf, "net connect port")?;
                Ok(Open::Connect { host, port })
            }
            v => Err(DecodeError::Invalid {
                field: "net open",
                value: v.into(),
            }),
        }
    }
    fn encoded_len(&self) -> usize {
        1 + match self {
            Open::Tunnel { want } => 1 + want.map_or(0, |_| 4),
            Open::Fallback { .. } => 4,
            Open::Connect { host, .. } => str_len(host) + 2,
        }
    }
}

/// `Opened.params` of a tunnel: the client's address and the exporter's end of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    pub client: Ipv4Addr,
    pub gateway: Ipv4Addr,
}

impl Codec for Assigned {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_slice(&self.client.octets());
        buf.put_slice(&self.gateway.octets());
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        Ok(Assigned {
            client: get_ipv4(buf, "net assigned client")?,
            gateway: get_ipv4(buf, "net assigned gateway")?,
        })
    }
    fn encoded_len(&self) -> usize {
        8
    }
}

/// `Opened.params` of a Connect: the exporter's end of the TCP connection (SOCKS BND.ADDR).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    pub bound: SocketAddrV4,
}

impl Codec for Connected {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_slice(&self.bound.ip().octets());
        buf.put_u16(self.bound.port());
    }
    fn decode(buf: &mut &[u8]) -> Result<Self, DecodeError> {
        let ip = get_ipv4(buf, "net bound address")?;
        let port = get_u16(buf, "net bound port")?;
        Ok(Connected {
            bound: SocketAddrV4::new(ip, port),
        })
    }
    fn encoded_len(&self) -> usize {
        6
    }
}

/// The first word of a refused Connect's reason, so that the client can answer SOCKS with the
/// right reply code (the generic `Reject` carries only `connect-failed`).
pub mod refusal {
    /// The destination is outside the exported subnets (SOCKS 0x02).
    pub const NOT_ALLOWED: &str = "not allowed";
    /// The name did not resolve (SOCKS 0x04).
    pub const NO_SUCH_HOST: &str = "no such host";
    /// No route to the network (SOCKS 0x03).
    pub const NET_UNREACHABLE: &str = "network unreachable";
    /// The host did not answer (SOCKS 0x04).
    pub const HOST_UNREACHABLE: &str = "host unreachable";
    /// The host answered with a reset (SOCKS 0x05).
    pub const REFUSED: &str = "connection refused";

    /// The SOCKS5 reply code for a refusal's reason (0x01, general failure, when it starts
    /// with no known word).
    pub fn socks_reply(reason: &str) -> u8 {
        let starts = |w: &str| reason.starts_with(w);
        if starts(NOT_ALLOWED) {
            0x02
        } else if starts(NET_UNREACHABLE) {
            0x03
        } else if starts(HOST_UNREACHABLE) || starts(NO_SUCH_HOST) {
            0x04
        } else if starts(REFUSED) {
            0x05
        } else {
            0x01
        }
    }
}

/// Largest packet a fallback frame carries (its length is a u16).
pub const FALLBACK_MAX: usize = u16::MAX as usize;

/// Appends one tunnel-stream frame: a 2-byte big-endian length, the 2-byte segment size
/// (0 for an ordinary packet), then the packet. `false` (nothing written) for a packet longer
/// than [`FALLBACK_MAX`].
pub fn put_fallback_frame(buf: &mut BytesMut, segment: u16, packet: &[u8]) -> bool {
    if packet.len() > FALLBACK_MAX {
        return false;
    }
    buf.put_u16(packet.len() as u16);
    buf.put_u16(segment);
    buf.put_slice(packet);
    true
}

/// Splits the next whole frame off the front of `buf` (its segment size and packet); what
/// remains is an incomplete frame.
pub fn next_fallback_frame(buf: &mut BytesMut) -> Option<(u16, bytes::Bytes)> {
    if buf.len() < 4 {
        return None;
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    let segment = u16::from_be_bytes([buf[2], buf[3]]);
    if buf.len() < 4 + len {
        return None;
    }
    let _ = buf.split_to(4);
    Some((segment, buf.split_to(len).freeze()))
}

/// Decodes `data` as every body of this kind (the fuzz target `kind_bodies` runs it for every
/// kind): whatever the bytes, nothing panics and nothing grows without bound.
pub fn fuzz(data: &[u8]) {
    let _ = Subnet::decode_exact(data);
    let _ = DeviceParams::decode_exact(data);
    let _ = Open::decode_exact(data);
    let _ = Assigned::decode_exact(data);
    let _ = Connected::decode_exact(data);
    let mut b = BytesMut::from(data);
    while next_fallback_frame(&mut b).is_some() {}
}

pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let lan = Subnet::new(Ipv4Addr::new(192, 168, 10, 0), 24).expect("subnet");
    vec![
        (
            "net-params",
            to_bytes(&DeviceParams {
                subnets: vec![lan],
                mtu: 1400,
            })
            .to_vec(),
        ),
        (
            "net-open-tunnel",
            to_bytes(&Open::Tunnel {
                want: Some(Ipv4Addr::new(100, 64, 100, 2)),
            })
            .to_vec(),
        ),
        (
            "net-open-fallback",
            to_bytes(&Open::Fallback {
                addr: Ipv4Addr::new(100, 64, 100, 2),
            })
            .to_vec(),
        ),
        (
            "net-open-connect",
            to_bytes(&Open::Connect {
                host: "board".into(),
                port: 22,
            })
            .to_vec(),
        ),
        (
            "net-assigned",
            to_bytes(&Assigned {
                client: Ipv4Addr::new(100, 64, 100, 2),
                gateway: Ipv4Addr::new(100, 64, 100, 1),
            })
            .to_vec(),
        ),
        (
            "net-connected",
            to_bytes(&Connected {
                bound: SocketAddrV4::new(Ipv4Addr::new(192, 168, 10, 1), 40000),
            })
            .to_vec(),
        ),
    ]
}

pub fn decode_example(name: &str, bytes: &[u8]) -> bool {
    match name {
        "net-params" => DeviceParams::decode_exact(bytes).is_ok(),
        "net-open-tunnel" | "net-open-fallback" | "net-open-connect" => {
            Open::decode_exact(bytes).is_ok()
        }
        "net-assigned" => Assigned::decode_exact(bytes).is_ok(),
        "net-connected" => Connected::decode_exact(bytes).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::testing::*;
    use proptest::prelude::*;

    fn arb_subnet() -> impl Strategy<Value = Subnet> {
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, p)| Subnet::new(Ipv4Addr::from(a & mask(p)), p).expect("masked address"))
    }

    fn arb_open() -> impl Strategy<Value = Open> {
        prop_oneof![
            proptest::option::of(any::<u32>()).prop_map(|w| Open::Tunnel {
                want: w.map(Ipv4Addr::from)
            }),
            any::<u32>().prop_map(|a| Open::Fallback {
                addr: Ipv4Addr::from(a)
            }),
            (any::<String>(), any::<u16>()).prop_map(|(host, port)| Open::Connect { host, port }),
        ]
    }

    proptest! {
        #[test]
        fn params_round_trip_and_corruption(subnets in proptest::collection::vec(arb_subnet(), 0..6), mtu in any::<u16>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            let p = DeviceParams { subnets, mtu };
            round_trip(&p);
            corrupt::<DeviceParams>(&to_bytes(&p), &flips, cut);
        }

        #[test]
        fn opens_round_trip_and_corruption(o in arb_open(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            round_trip(&o);
            corrupt::<Open>(&to_bytes(&o), &flips, cut);
        }

        #[test]
        fn answers_round_trip_and_corruption(a in any::<u32>(), b in any::<u32>(), port in any::<u16>(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in any::<usize>()) {
            let s = Assigned { client: Ipv4Addr::from(a), gateway: Ipv4Addr::from(b) };
            round_trip(&s);
            corrupt::<Assigned>(&to_bytes(&s), &flips, cut);
            let c = Connected { bound: SocketAddrV4::new(Ipv4Addr::from(a), port) };
            round_trip(&c);
            corrupt::<Connected>(&to_bytes(&c), &flips, cut);
        }

        /// Fallback frames come back whole and in order however the stream splits them.
        #[test]
        fn fallback_frames_survive_any_split(packets in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 0..3000)), 0..8), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
            let mut wire = BytesMut::new();
            for (seg, p) in &packets {
                prop_assert!(put_fallback_frame(&mut wire, *seg, p));
            }
            let wire = wire.freeze();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(wire.len());
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut at = 0;
            for c in cuts {
                buf.extend_from_slice(&wire[at..c]);
                at = c;
                while let Some((seg, f)) = next_fallback_frame(&mut buf) {
                    got.push((seg, f.to_vec()));
                }
            }
            prop_assert_eq!(got, packets);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn subnets_parse_what_they_print(s in arb_subnet()) {
            prop_assert_eq!(s.to_string().parse::<Subnet>(), Ok(s));
        }
    }

    #[test]
    fn subnets_contain_overlap_and_refuse_host_bits() {
        let lan: Subnet = "192.168.10.0/24".parse().expect("subnet");
        assert!(lan.contains(Ipv4Addr::new(192, 168, 10, 2)));
        assert!(!lan.contains(Ipv4Addr::new(192, 168, 11, 2)));
        let wide: Subnet = "192.168.0.0/16".parse().expect("subnet");
        assert!(lan.overlaps(&wide) && wide.overlaps(&lan));
        assert!(!lan.overlaps(&"192.168.11.0/24".parse().expect("subnet")));
        let e = "192.168.10.1/24".parse::<Subnet>().expect_err("host bits");
        assert!(e.contains("192.168.10.0/24"), "{e}");
        assert!("192.168.10.0/33".parse::<Subnet>().is_err());
        assert!("lan".parse::<Subnet>().is_err());
        assert_eq!(lan.nth(2), Some(Ipv4Addr::new(192, 168, 10, 2)));
        assert_eq!(lan.nth(256), None);
        assert_eq!(refusal::socks_reply("not allowed: 10.0.0.1"), 0x02);
        assert_eq!(refusal::socks_reply("connection refused: x"), 0x05);
        assert_eq!(refusal::socks_reply("weird"), 0x01);
    }
}
