//! The device kinds' own wire: one module per kind, each with the typed bodies that the generic
//! messages carry as opaque bytes (`DeviceInfo.params`, `Open.params`, `Opened.params`,
//! `Control.body`, `Request.body`, `Done.body`, `Status.params`), their codec and their tests.
//!
//! The generic layer (`crate::message`, `crate::session`) never looks inside these bytes, so a
//! new kind is a new module here plus one line in [`kinds!`]; nothing else in this crate changes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod can;
pub mod net;
pub mod power;
pub mod serial;
pub mod storage;
pub mod tcp;
pub mod udp;

/// Declares the kinds: the variant and its name on the wire, in configs and in output.
macro_rules! kinds {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// A device kind. On the wire it is a string, so that an exporter newer than its client
        /// can offer kinds the client does not know ([`Kind::Other`]: shown, not bridged).
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind {
            $($variant,)*
            Other(String),
        }

        impl Kind {
            /// Every kind this build knows.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),*];

            pub fn as_str(&self) -> &str {
                match self {
                    $(Kind::$variant => $name,)*
                    Kind::Other(s) => s,
                }
            }

            pub fn from_wire(s: &str) -> Kind {
                match s {
                    $($name => Kind::$variant,)*
                    other => Kind::Other(other.to_string()),
                }
            }
        }
    };
}

kinds! {
    Serial => "serial",
    Tcp => "tcp",
    Power => "power",
    Network => "network",
    Udp => "udp",
    Can => "can",
    Storage => "storage",
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Kind::from_wire(&s))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Shared by the kinds' tests: the four ways every body is tested.
    use crate::codec::{Codec, DecodeError};
    use bytes::BytesMut;

    /// Round trip and `encoded_len`.
    pub fn round_trip<T: Codec + PartialEq + std::fmt::Debug>(v: &T) {
        let mut b = BytesMut::new();
        v.encode(&mut b);
        assert_eq!(b.len(), v.encoded_len(), "encoded_len of {v:?}");
        assert_eq!(T::decode_exact(&b).as_ref(), Ok(v), "round trip");
    }

    /// Corrupted and truncated encodings never panic.
    pub fn corrupt<T: Codec>(bytes: &[u8], flips: &[(usize, u8)], cut: usize) {
        let mut b = bytes.to_vec();
        for &(i, x) in flips {
            if !b.is_empty() {
                let i = i % b.len();
                b[i] ^= x;
            }
        }
        let cut = cut % (b.len() + 1);
        let _: Result<T, DecodeError> = T::decode_exact(&b[..cut]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip_and_unknown_ones_survive() {
        for k in Kind::ALL {
            assert_eq!(&Kind::from_wire(k.as_str()), k);
        }
        let k = Kind::from_wire("hologram");
        assert_eq!(k, Kind::Other("hologram".into()));
        assert_eq!(k.as_str(), "hologram");
        assert_eq!(
            serde_json::to_string(&Kind::Serial).ok().as_deref(),
            Some("\"serial\"")
        );
    }
}
