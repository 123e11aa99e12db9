//! Value types shared by the kinds' config specs: sizes (`64KiB`) and durations (`2s`, `500ms`)
//! as people write them in YAML.

use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// A size in bytes: `65536`, `"64KiB"`, `"1MiB"`, `"64k"`, `"2GiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number of bytes like 65536 or 64KiB")
        })?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {unit:?} (use KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration: `2s`, `500ms`, `1m30s`, or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSpec(pub Duration);

impl DurationSpec {
    pub fn parse(s: &str) -> Result<DurationSpec, String> {
        let t = s.trim();
        if let Ok(n) = t.parse::<u64>() {
            return Ok(DurationSpec(Duration::from_secs(n)));
        }
        humantime::parse_duration(t)
            .map(DurationSpec)
            .map_err(|e| format!("invalid duration {s:?}: {e} (examples: 2s, 500ms, 1m30s)"))
    }
}

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(DurationSpec(Duration::from_secs(n))),
            Raw::S(s) => DurationSpec::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_and_name_bad_input() {
        assert_eq!(ByteSize::parse("65536"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("64KiB"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("2 MiB"), Ok(ByteSize(2 << 20)));
        assert_eq!(ByteSize::parse("2GiB"), Ok(ByteSize(2 << 30)));
        assert!(ByteSize::parse("x").unwrap_err().contains("\"x\""));
        assert!(ByteSize::parse("1TiB")
            .unwrap_err()
            .contains("unknown unit"));
        assert_eq!(
            DurationSpec::parse("500ms"),
            Ok(DurationSpec(Duration::from_millis(500)))
        );
        assert_eq!(
            DurationSpec::parse("3"),
            Ok(DurationSpec(Duration::from_secs(3)))
        );
        assert!(DurationSpec::parse("soon").unwrap_err().contains("soon"));
    }
}
