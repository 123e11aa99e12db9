//! The one rule that turns an exporter's name into a network interface name.
//!
//! Linux allows at most 15 bytes. The name is `PREFIX` + the exporter's name when that fits;
//! otherwise `PREFIX` + the first bytes of the name + `-` + 4 hex digits of the SHA-256 of the
//! whole name, 15 bytes in all, so that two long names sharing a beginning still differ. The
//! exporter's name has passed [`jmp_protocol::name::check`] (letters, digits, `.`, `_`, `-`,
//! starting with a letter or digit), so the result never holds `/`, spaces or `:`, and it is
//! never `.` or `..`.
//!
//! The client's tunnel is `jmp-<exporter>` (`jmp-rpi4-01`), the exporter's `jmpd-<exporter>`.

use jmp_protocol::name::{self, NameError};

/// Longest interface name Linux accepts (IFNAMSIZ less the NUL).
pub const IFNAME_MAX: usize = 15;
/// The client's TUN.
pub const CLIENT_PREFIX: &str = "jmp-";
/// The exporter's TUN, and its nftables table.
pub const EXPORTER_PREFIX: &str = "jmpd-";

/// The interface name for `exporter` under `prefix` (a short ASCII prefix).
pub fn ifname(prefix: &str, exporter: &str) -> Result<String, NameError> {
    name::check("exporter name", exporter)?;
    if prefix.len() + exporter.len() <= IFNAME_MAX {
        return Ok(format!("{prefix}{exporter}"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, exporter.as_bytes());
    let tag = hex::encode(&digest.as_ref()[..2]);
    let keep = IFNAME_MAX - prefix.len() - 1 - tag.len();
    // The name is ASCII (checked above): any byte index is a char boundary.
    Ok(format!("{prefix}{}-{tag}", &exporter[..keep]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_long_ones_shortened_distinctly_bad_ones_refused() {
        assert_eq!(
            ifname(CLIENT_PREFIX, "rpi4-01").as_deref(),
            Ok("jmp-rpi4-01")
        );
        assert_eq!(
            ifname(CLIENT_PREFIX, "elevenchars").as_deref(),
            Ok("jmp-elevenchars")
        );
        let a = ifname(CLIENT_PREFIX, "lab-rack-3-board-17").expect("long");
        let b = ifname(CLIENT_PREFIX, "lab-rack-3-board-18").expect("long");
        assert_eq!(a.len(), IFNAME_MAX, "{a}");
        assert!(a.starts_with("jmp-lab-ra"), "{a}");
        assert_ne!(a, b);
        let d = ifname(EXPORTER_PREFIX, "lab-rack-3-board-17").expect("long");
        assert_eq!(d.len(), IFNAME_MAX, "{d}");
        for bad in ["a/b", "..", "", "x y", "-x", "a:b"] {
            assert!(ifname(CLIENT_PREFIX, bad).is_err(), "{bad:?}");
        }
    }
}
