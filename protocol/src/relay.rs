//! The relay's own packets: how an exporter behind NAT and a client reach each other through
//! the controller without the controller reading their traffic.
//!
//! A relay session is one UDP port on the controller. The exporter sends a **punch** to it from
//! its QUIC socket (its NAT or firewall then lets the relay's answers in, as answers to an
//! outbound flow); the client sends a **claim** from the socket its QUIC endpoint will use and
//! waits for the **ack**. From then on the relay forwards every other datagram between the two
//! addresses, unchanged: QUIC packets, end-to-end encrypted between `jmp` and `jmpd`. The secrets
//! come over the authenticated controller API (the exporter's on its registration stream, the
//! client's in the answer to its `relay` call, which needs a valid lease token).
//!
//! Layout (22 bytes): `00` `"JMPR"` type:u8 secret:16 bytes. A datagram is a relay packet only if
//! it has exactly this length, this prefix and the session's secret for its type; anything else
//! is payload (QUIC may clear the first byte's fixed bit, so the first byte alone proves
//! nothing; the 128-bit secret does).

/// Length of every relay packet.
pub const PACKET_LEN: usize = 22;
const MAGIC: [u8; 5] = [0x00, b'J', b'M', b'P', b'R'];

/// What a relay packet says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Exporter → relay: "this address is the exporter of the session".
    Punch = 1,
    /// Client → relay: "this address is the client of the session".
    Claim = 2,
    /// Relay → client: the claim was accepted; start QUIC.
    Ack = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Punch),
            2 => Some(Kind::Claim),
            3 => Some(Kind::Ack),
            _ => None,
        }
    }
}

/// A session secret (16 random bytes; hex on the controller API).
pub type Secret = [u8; 16];

pub fn encode(kind: Kind, secret: &Secret) -> [u8; PACKET_LEN] {
    let mut p = [0u8; PACKET_LEN];
    p[..5].copy_from_slice(&MAGIC);
    p[5] = kind as u8;
    p[6..].copy_from_slice(secret);
    p
}

/// The kind and secret of a relay packet; `None` for anything else (then it is payload).
pub fn decode(datagram: &[u8]) -> Option<(Kind, Secret)> {
    if datagram.len() != PACKET_LEN || datagram[..5] != MAGIC {
        return None;
    }
    let kind = Kind::from_u8(datagram[5])?;
    let mut s = [0u8; 16];
    s.copy_from_slice(&datagram[6..]);
    Some((kind, s))
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &Secret, b: &Secret) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses a secret from the API's hex form, naming what is wrong.
pub fn parse_secret(hex: &str) -> Result<Secret, String> {
    let h = hex.trim();
    if h.len() != 32 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "relay secret must be 32 hex digits, got {} characters",
            h.len()
        ));
    }
    let mut s = [0u8; 16];
    for (i, byte) in s.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

pub fn secret_hex(s: &Secret) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

/// The examples of docs/protocol.md (checked by its hex test).
#[cfg(test)]
pub(crate) fn examples() -> Vec<(&'static str, Vec<u8>)> {
    vec![(
        "relay-claim",
        encode(Kind::Claim, b"0123456789abcdef").to_vec(),
    )]
}

#[cfg(test)]
pub(crate) fn decode_example(name: &str, bytes: &[u8]) -> bool {
    name == "relay-claim" && decode(bytes).is_some_and(|(k, _)| k == Kind::Claim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_packet_round_trips_and_its_hex_is_pinned() {
        let s: Secret = *b"0123456789abcdef";
        let p = encode(Kind::Claim, &s);
        assert_eq!(
            hex::encode(p),
            "004a4d50520230313233343536373839616263646566"
        );
        assert_eq!(decode(&p), Some((Kind::Claim, s)));
        assert_eq!(parse_secret(&secret_hex(&s)), Ok(s));
    }

    #[test]
    fn anything_else_is_payload() {
        let s = [7u8; 16];
        let p = encode(Kind::Punch, &s);
        assert_eq!(decode(&p[..21]), None, "short");
        let mut long = p.to_vec();
        long.push(0);
        assert_eq!(decode(&long), None, "long");
        let mut bad = p;
        bad[5] = 9;
        assert_eq!(decode(&bad), None, "unknown type");
        bad = p;
        bad[1] = b'X';
        assert_eq!(decode(&bad), None, "magic");
        assert!(!same_secret(&s, &[8u8; 16]));
        assert!(same_secret(&s, &s));
        assert!(parse_secret("abc").unwrap_err().contains("32 hex digits"));
        assert!(parse_secret(&"zz".repeat(16)).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&d);
        }
    }
}
