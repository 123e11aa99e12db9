//! The device kinds' own wire: one module per kind, each with the typed bodies that the generic
//! messages carry as opaque bytes (`DeviceInfo.params`, `Open.params`, `Opened.params`,
//! `Control.body`, `Request.body`, `Done.body`, `Status.params`), their codec and their tests.
//!
//! The generic layer (`crate::message`, `crate::session`) never looks inside these bytes, so a
//! new kind is a new module here plus one line in [`kinds!`]; nothing else in this crate changes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares the kinds, one line each: the variant, its wire module (which must provide
/// `examples()`, `decode_example()` and `fuzz()`, see [`Wire`]) and its name on the wire, in
/// configs and in output. Tests and fuzz targets iterate [`WIRE`], so a kind cannot be left out
/// of them.
macro_rules! kinds {
    ($($variant:ident => $module:ident, $name:literal),* $(,)?) => {
        $(pub mod $module;)*

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

        /// Every kind's wire module, in the order of [`Kind::ALL`].
        pub const WIRE: &[Wire] = &[$(Wire {
            kind: Kind::$variant,
            module: stringify!($module),
            examples: $module::examples,
            decode_example: $module::decode_example,
            fuzz: $module::fuzz,
        }),*];
    };
}

kinds! {
    Serial => serial, "serial",
    Tcp => tcp, "tcp",
    Power => power, "power",
    Network => net, "network",
    Udp => udp, "udp",
    Can => can, "can",
    Storage => storage, "storage",
    Usb => usb, "usb",
}

/// What every kind's wire module provides, so that tests, docs and fuzz targets cover each kind
/// without naming it.
pub struct Wire {
    pub kind: Kind,
    /// The module's name (`net` for `network`); its device parameters' example is named
    /// `<module>-params`.
    pub module: &'static str,
    /// Named encodings of the kind's bodies: the hex examples of docs/protocol.md.
    pub examples: fn() -> Vec<(&'static str, Vec<u8>)>,
    /// Whether `bytes` decode as the body the example `name` shows.
    pub decode_example: fn(&str, &[u8]) -> bool,
    /// Decodes arbitrary bytes as every body of the kind (must never panic).
    pub fuzz: fn(&[u8]),
}

impl Wire {
    /// The encoded example of the kind's device parameters (`DeviceInfo.params`).
    pub fn params_example(&self) -> Option<Vec<u8>> {
        let name = format!("{}-params", self.module);
        (self.examples)()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b)
    }
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

    #[test]
    fn every_kind_has_its_wire_surface() {
        assert_eq!(WIRE.len(), Kind::ALL.len());
        for (w, k) in WIRE.iter().zip(Kind::ALL) {
            assert_eq!(&w.kind, k);
            assert!(
                w.params_example().is_some(),
                "{k}: no example named {}-params",
                w.module
            );
            let examples = (w.examples)();
            for (name, bytes) in &examples {
                assert!(
                    name.starts_with(w.module) || !name.contains('-'),
                    "{k}: example {name} is not named after its module"
                );
                assert!(
                    (w.decode_example)(name, bytes),
                    "{k}: {name} does not decode"
                );
                // The fuzz entry takes every example and every cut of it.
                for cut in 0..=bytes.len() {
                    (w.fuzz)(&bytes[..cut]);
                }
            }
        }
    }
}
