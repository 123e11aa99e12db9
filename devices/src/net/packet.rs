//! The little of an IPv4 header the tunnel looks at: where a packet comes from and goes to,
//! checked before anything is forwarded. Everything else is the kernel's business.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

/// Why a packet is not a well-formed IPv4 packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("a packet of {0} bytes is shorter than an IPv4 header")]
    Short(usize),
    #[error("not IPv4 (IP version {0})")]
    Version(u8),
    #[error("IPv4 header length {0} is invalid")]
    HeaderLength(usize),
    #[error("the IPv4 total length says {said} bytes, the packet has {has}")]
    TotalLength { said: usize, has: usize },
}

pub(crate) fn parse_ipv4(p: &[u8]) -> Result<Ipv4Info, Malformed> {
    parse_ipv4_head(p, p.len())
}

/// The same for a packet of `len` bytes of which `head` holds the first ones (at least the
/// IPv4 header: a packet spread over several buffers).
pub(crate) fn parse_ipv4_head(head: &[u8], len: usize) -> Result<Ipv4Info, Malformed> {
    let p = head;
    if p.len() < 20 || len < 20 {
        return Err(Malformed::Short(len.min(p.len())));
    }
    let version = p[0] >> 4;
    if version != 4 {
        return Err(Malformed::Version(version));
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl < 20 || ihl > p.len() {
        return Err(Malformed::HeaderLength(ihl));
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total != len {
        return Err(Malformed::TotalLength {
            said: total,
            has: len,
        });
    }
    Ok(Ipv4Info {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
    })
}

#[cfg(test)]
pub(crate) fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let mut sum = 0u32;
    for c in p.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    p[10] = (ck >> 8) as u8;
    p[11] = ck as u8;
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_packets_parse_bad_ones_say_why() {
        let a = Ipv4Addr::new(100, 64, 100, 2);
        let b = Ipv4Addr::new(192, 168, 10, 2);
        let p = ipv4_packet(a, b, b"hello");
        assert_eq!(parse_ipv4(&p), Ok(Ipv4Info { src: a, dst: b }));
        assert_eq!(parse_ipv4(&p[..10]), Err(Malformed::Short(10)));
        assert!(matches!(
            parse_ipv4(&p[..22]),
            Err(Malformed::TotalLength { said: 25, has: 22 })
        ));
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(Malformed::Version(6)));
        let mut ihl = p;
        ihl[0] = 0x4f;
        assert_eq!(parse_ipv4(&ihl), Err(Malformed::HeaderLength(60)));
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_ipv4(&b);
        }
    }
}
